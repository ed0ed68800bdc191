# Where each experiment's numbers come from, on this machine.

import glob
import shlex
import subprocess

from snakemake.settings.types import DeploymentMethod


def _has_cuda():
    if config.get("gpu") in (True, False):
        return config["gpu"]
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() == "True"


HAS_CUDA = _has_cuda()
SCALE = config.get("scale", "paper" if HAS_CUDA else "smoke")
RESULTS = config.get("results", "results")
if not isinstance(RESULTS, str) or not RESULTS.strip():  # `results=` reads as None
    raise ValueError(f"--config results={RESULTS!r}: must name a directory (default: results)")
# Every rule runs Python modules with the interpreter this workflow runs under, so that
# .venv/bin/snakemake works without the venv on PATH; with --use-conda (--sdm conda) a rule
# runs inside its conda environment, whose own python is the one on PATH there.
PYTHON = "python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method \
    else shlex.quote(sys.executable)
ENV_FILE = "../../environment.yml"  # relative to the rule files
REFERENCE = "data/reference/h200"
PAPER_PDF = "paper/main.pdf"



def run_env(exp):
    """Without a GPU, Triton kernels run on the CPU only in the interpreter (slow: smoke shapes
    only); the SRAM study compiles for sm_90 instead, and GPU runs compile for the GPU: both
    must not be interpreted, whatever the caller's environment says."""
    interpret = not HAS_CUDA and exp != "e2_sram"
    return "TRITON_INTERPRET=1" if interpret else "env -u TRITON_INTERPRET"


# Experiments whose paper numbers need the H200; without CUDA the paper quotes the committed
# reference measurements for these, and the smoke runs only check that the code works.
GPU_EXPERIMENTS = ["e1_throughput", "e3_hash", "e4_stability", "e4_recompute", "e5_accuracy", "e6_commit"]
# Experiments whose paper numbers are measured wherever the pipeline runs, at the given scale.
# (The SRAM study compiles for sm_90 on any machine; `--config sram_scale=smoke` shortens it. The
# live-cache tamper study counts detections, which do not depend on the hardware.)
LOCAL_EXPERIMENTS = {"e0_unfused": SCALE, "e2_sram": config.get("sram_scale", "paper"), "e6_live": SCALE}
PAPER_EXPERIMENTS = list(LOCAL_EXPERIMENTS) + GPU_EXPERIMENTS
# Timed on a GPU: one at a time (resources gpu=1, capped by the profile).
TIMED = ["e0_unfused", "e1_throughput", "e3_hash", "e5_train", "e6_commit"]
SMOKE_FIGURES = GPU_EXPERIMENTS


def result(exp, scale):
    return f"{RESULTS}/{scale}/{exp}/{exp}.csv"


def manifest(csv):
    """The manifest beside a results CSV (the naming of fieldprint.results.manifest_path)."""
    return csv.removesuffix(".csv") + ".manifest.json"


def with_manifest(csv):
    """A results CSV and its manifest: the inputs of a rule that reads the results."""
    return [csv, manifest(csv)]


def paper_source(exp):
    """The results file the paper quotes for ``exp`` on this machine: fresh measurements where
    this machine can make them, else the committed H200 reference, else (no reference yet) this
    machine's smoke run, whose manifest then labels the numbers as such."""
    if exp in LOCAL_EXPERIMENTS:
        return result(exp, LOCAL_EXPERIMENTS[exp])
    if HAS_CUDA:
        return result(exp, "paper")
    reference = f"{REFERENCE}/{exp}.csv"
    return reference if os.path.exists(reference) else result(exp, "smoke")


def report_code(exp):
    """The modules that turn ``exp``'s results into macros and claims: a change to them remakes
    the generated LaTeX (the shell command alone does not name them)."""
    return [f"src/fieldprint/report/{exp}.py", "src/fieldprint/report/__init__.py"]


def verdict_code():
    """The modules behind the claims report, the reproduction report and the artifact appendix:
    every experiment's report module and the AE claims table (a change to a claim remakes them)."""
    return sorted({f for exp in PAPER_EXPERIMENTS for f in report_code(exp)}
                  | {"src/fieldprint/report/reproduction.py", "src/fieldprint/report/__main__.py"})


def plot_code(exp):
    """The modules that draw ``exp``'s figure (the figure labels come from its report module)."""
    return [f"src/fieldprint/plots/{exp}.py", "src/fieldprint/plots/style.py", *report_code(exp)]


def hydra_inputs(exp, scale):
    """The YAML files a Hydra run of ``exp`` at ``scale`` composes."""
    return [
        f"configs/{exp}.yaml",
        f"configs/{exp}/{scale}.yaml",
        f"configs/scale/{scale}.yaml",
        "configs/common.yaml",
    ]


# Data an experiment reads besides its configs (the weights path is SMOLLM2_GGUF of models.smk).
EXPERIMENT_DATA = {"e4_recompute": ["models/SmolLM2-135M-Instruct.Q4_1.gguf", "data/corpus/valid.txt"]}


def gpu_slot(exp):
    return 1 if HAS_CUDA and exp in TIMED else 0


def timed_threads(exp):
    """A timed GPU run owns the machine's cores too: Snakemake sets OMP_NUM_THREADS to a job's
    threads, which would leave the host-side work of the baselines (CPU hashing, copies) on one."""
    return workflow.cores if gpu_slot(exp) else 1
