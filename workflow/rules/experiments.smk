# One rule per kind of run; the experiment and scale are wildcards, Hydra does the rest.


wildcard_constraints:
    scale="smoke|paper",
    exp="e0_unfused|e1_throughput|e2_sram|e3_hash|e4_stability|e4_recompute|e6_commit|e6_live",


rule corpus:
    output:
        "data/corpus/train.txt",
        "data/corpus/valid.txt",
        "data/corpus/MANIFEST.json",
    params:
        python=PYTHON,
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        f"{RESULTS}/logs/corpus.log",
    conda:
        ENV_FILE
    shell:
        "{params.python} -m fieldprint.corpus data/corpus > {log} 2>&1"


rule experiment:
    input:
        lambda wc: hydra_inputs(wc.exp, wc.scale) + EXPERIMENT_DATA.get(wc.exp, []),
    output:
        csv=f"{RESULTS}/{{scale}}/{{exp}}/{{exp}}.csv",
        manifest=f"{RESULTS}/{{scale}}/{{exp}}/{{exp}}.manifest.json",
    params:
        python=PYTHON,
        env=lambda wc: run_env(wc.exp),
        out_dir=lambda wc: f"{RESULTS}/{wc.scale}/{wc.exp}",
    threads: lambda wc: timed_threads(wc.exp)
    resources:
        # gpu: the job uses the GPU (the default profile caps gpu at 1; the SLURM plugin asks for
        # --gpus=1). E0 and E2 run on the CPU and ask for none. mem_mb: host memory (MB).
        gpu=lambda wc: int(HAS_CUDA and wc.exp in GPU_EXPERIMENTS),
        mem_mb=lambda wc: 4000 if wc.scale == "smoke" else (32000 if HAS_CUDA and wc.exp in GPU_EXPERIMENTS else 8000),
        runtime=lambda wc: 120 if wc.scale == "paper" else 30,
    log:
        f"{RESULTS}/logs/{{exp}}.{{scale}}.log",
    conda:
        ENV_FILE
    shell:
        "{params.env} {params.python} -m fieldprint.experiments.{wildcards.exp} scale={wildcards.scale} "
        "out_dir={params.out_dir} > {log} 2>&1"


rule train:
    input:
        hydra_inputs("e5_train", "{scale}"),
        "data/corpus/train.txt",
        "data/corpus/valid.txt",
    output:
        checkpoint=f"{RESULTS}/{{scale}}/e5_train/model.pt",
        csv=f"{RESULTS}/{{scale}}/e5_train/e5_train.csv",
        manifest=f"{RESULTS}/{{scale}}/e5_train/e5_train.manifest.json",
    params:
        python=PYTHON,
        env=run_env("e5"),
        out_dir=lambda wc: f"{RESULTS}/{wc.scale}/e5_train",
    threads: timed_threads("e5_train")
    resources:
        gpu=int(HAS_CUDA),
        mem_mb=lambda wc: 32000 if HAS_CUDA and wc.scale == "paper" else 4000,
        runtime=lambda wc: 60 if wc.scale == "paper" else 30,
    log:
        f"{RESULTS}/logs/e5_train.{{scale}}.log",
    conda:
        ENV_FILE
    shell:
        "{params.env} {params.python} -m fieldprint.experiments.e5_train scale={wildcards.scale} "
        "out_dir={params.out_dir} > {log} 2>&1"


rule accuracy:
    input:
        hydra_inputs("e5_accuracy", "{scale}"),
        "data/corpus/valid.txt",
        checkpoint=f"{RESULTS}/{{scale}}/e5_train/model.pt",
    output:
        csv=f"{RESULTS}/{{scale}}/e5_accuracy/e5_accuracy.csv",
        manifest=f"{RESULTS}/{{scale}}/e5_accuracy/e5_accuracy.manifest.json",
    params:
        python=PYTHON,
        env=run_env("e5"),
        out_dir=lambda wc: f"{RESULTS}/{wc.scale}/e5_accuracy",
    resources:
        gpu=int(HAS_CUDA),
        mem_mb=lambda wc: 32000 if HAS_CUDA and wc.scale == "paper" else 4000,
        runtime=lambda wc: 120 if wc.scale == "paper" else 30,
    log:
        f"{RESULTS}/logs/e5_accuracy.{{scale}}.log",
    conda:
        ENV_FILE
    shell:
        "{params.env} {params.python} -m fieldprint.experiments.e5_accuracy scale={wildcards.scale} "
        "checkpoint={input.checkpoint} out_dir={params.out_dir} > {log} 2>&1"


# E3's hashing launches compiled for sm_90 on this machine (no GPU needed, under a minute): SASS
# counts of BLAKE3's compression loop, from which report/e3_hash.py derives the integer-issue
# ceiling. The kernel's source is an input: the counts are of that code.
SASS_RESULT = result("e3_sass", "paper")


rule sass_counts:
    input:
        "configs/e3_sass.yaml",
        "configs/e3_sass/paper.yaml",
        "configs/scale/paper.yaml",
        "configs/common.yaml",
        "src/fieldprint/hashing/_kernels.py",
    output:
        csv=SASS_RESULT,
        manifest=manifest(SASS_RESULT),
    params:
        python=PYTHON,
        out_dir=lambda w, output: os.path.dirname(output.csv),
    resources:
        mem_mb=2000,
        runtime=10,
    log:
        f"{RESULTS}/logs/e3_sass.log",
    conda:
        ENV_FILE
    shell:
        "env -u TRITON_INTERPRET {params.python} -m fieldprint.experiments.e3_sass "
        "out_dir={params.out_dir} > {log} 2>&1"
