"""The artifact-evaluation table (fieldprint.report.reproduction): the PASS / FAIL / NOT RUN rule
on hand-made results, the committed references against their own checks, the appendix macros
against the manifests, the command line, and the citation metadata against pyproject.toml."""

import importlib
import json
import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from fieldprint.experiments.common import REPO_ROOT
from fieldprint.report import Claim, render_macros
from fieldprint.report.reproduction import (
    AE_CLAIMS,
    EXPERIMENTS,
    FAIL,
    NOT_RUN,
    PASS,
    Absolute,
    Check,
    Exact,
    Holds,
    Outcome,
    Relative,
    Run,
    artifact_macros,
    judge,
    judge_all,
    number,
    reproduction_report,
    verdict,
)

H200 = REPO_ROOT / "data/reference/h200"
CPU = REPO_ROOT / "data/reference/cpu"
GPU_MANIFEST = {"gpu": "NVIDIA H200", "cpu_count": 16, "date": "2026-11-30T00:00:00+00:00",
                "commit": "0" * 40, "dirty": False}
CPU_MANIFEST = {**GPU_MANIFEST, "gpu": None, "cpu_count": 2}


def report_module(exp):
    return importlib.import_module(f"fieldprint.report.{exp}")


def e1_rows(fused_ms: float, cudnn_ms: float) -> list[dict]:
    """Decode at B=64, L=4K with 64 anchors: the fused kernel and contiguous cuDNN SDPA."""
    base = {"mode": "decode", "batch": 64, "context": 4096, "anchors": 64, "kv_dtype": "bf16",
            "tflops": 1.0, "rel_err": 1e-3, "skipped": None}
    return [{**base, "impl": "fused", "ms": fused_ms, "tbps": 4.0 / fused_ms},
            {**base, "impl": "cudnn_sdpa", "ms": cudnn_ms, "tbps": 4.0 / cudnn_ms}]


def e1_run(fused_ms, cudnn_ms, manifest=GPU_MANIFEST) -> Run:
    return Run.from_rows("e1_throughput", e1_rows(fused_ms, cudnn_ms), manifest, report_module)


RATIO_CHECK = Check("e1_throughput", "e1.ratio_cudnn_b64l4k", Relative(15), "speed vs cuDNN")
CORRECT_CHECK = Check("e1_throughput", "e1.correct", Holds())


# ---------------------------------------------------------------- the rule, on hand-made rows


def test_ratio_within_tolerance_passes_outside_fails():
    reference = e1_run(1.0, 0.93)  # cuDNN time / fused time: 0.93
    assert reference.values["e1.ratio_cudnn_b64l4k"] == "0.93"
    inside = judge(RATIO_CHECK, reference, e1_run(1.0, 0.84))  # 0.84 / 0.93 - 1 = -9.7%
    assert (inside.verdict, inside.reference, inside.fresh) == (PASS, "0.93", "0.84")
    outside = judge(RATIO_CHECK, reference, e1_run(1.0, 0.75))  # -19.4%
    assert (outside.verdict, outside.fresh) == (FAIL, "0.75")
    faster = judge(RATIO_CHECK, reference, e1_run(1.0, 1.10))  # +18.3%: a band, not a floor
    assert faster.verdict == FAIL


def test_gpu_check_without_gpu_results_is_not_run_never_pass():
    reference = e1_run(1.0, 0.93)
    for check in (RATIO_CHECK, CORRECT_CHECK):
        absent = judge(check, reference, None)
        assert (absent.verdict, absent.fresh) == (NOT_RUN, "needs a GPU")
        # identical numbers from a CPU run (a smoke run under the interpreter) do not count
        on_cpu = judge(check, reference, e1_run(1.0, 0.93, CPU_MANIFEST))
        assert (on_cpu.verdict, on_cpu.fresh) == (NOT_RUN, "needs a GPU")


def test_holds_follows_the_fresh_runs_claim():
    reference = e1_run(1.0, 0.93)
    ok = judge(CORRECT_CHECK, reference, e1_run(1.0, 0.93))
    assert ok.verdict == PASS and ok.reference == "supported" and ok.fresh.startswith("supported")
    wrong = Run.from_rows("e1_throughput", [{**r, "rel_err": 0.5} for r in e1_rows(1.0, 0.93)], GPU_MANIFEST,
                          report_module)
    bad = judge(CORRECT_CHECK, reference, wrong)
    assert bad.verdict == FAIL and bad.fresh.startswith("not supported")
    missing = judge(Check("e1_throughput", "e1.no_such_claim", Holds()), reference, e1_run(1.0, 0.93))
    assert missing.verdict == FAIL and "does not report" in missing.fresh


def hand_run(values: dict[str, str], claims=(), manifest=GPU_MANIFEST) -> Run:
    return Run(values, {c.id: c for c in claims}, manifest)


def test_exact_and_absolute_rules():
    exact = Check("e6_commit", "e6.tamper.detected_pct", Exact(), "detected")
    ref = hand_run({"e6.tamper.detected_pct": "100.0", "e6.x": "14.29", "e6.n": "1{,}024"})
    assert judge(exact, ref, hand_run({"e6.tamper.detected_pct": "100.0"})).verdict == PASS
    assert judge(exact, ref, hand_run({"e6.tamper.detected_pct": "99.8"})).verdict == FAIL
    points = Check("e6_commit", "e6.x", Absolute(1, "percentage points"), "overhead")
    assert judge(points, ref, hand_run({"e6.x": "13.50"})).verdict == PASS  # 0.79 points
    assert judge(points, ref, hand_run({"e6.x": "12.00"})).verdict == FAIL  # 2.29 points
    assert judge(points, ref, hand_run({"e6.x": "n/a"})).verdict == FAIL  # not measured
    assert judge(points, ref, hand_run({})).verdict == FAIL  # not printed at all
    grouped = Check("e6_commit", "e6.n", Relative(5), "pages")
    assert judge(grouped, ref, hand_run({"e6.n": "1{,}000"})).verdict == PASS  # 2.3% below


def test_local_experiment_is_judged_by_its_claim_without_reference():
    check = Check("e6_live", "live.no_false_alarm", Holds())
    honest = hand_run({}, [Claim("live.no_false_alarm", "t", True, "0 false alarms")], CPU_MANIFEST)
    assert judge(check, None, honest).verdict == PASS  # measured on a CPU: fine for a CPU study
    alarmed = hand_run({}, [Claim("live.no_false_alarm", "t", False, "3 false alarms")], CPU_MANIFEST)
    assert judge(check, None, alarmed).verdict == FAIL
    assert judge(check, None, None).fresh == "no results in this run"


def test_claim_verdict_fail_beats_not_run_beats_pass():
    p, f, n = Outcome(PASS, "", ""), Outcome(FAIL, "", ""), Outcome(NOT_RUN, "", "")
    assert verdict([p, p]) == PASS and verdict([p, n]) == NOT_RUN and verdict([n, f, p]) == FAIL


def test_number_reads_what_the_paper_prints():
    assert number("1{,}024") == 1024 and number("4\\,096") == 4096 and number("$-$0.01") == -0.01
    assert number("+0.02") == 0.02 and number("n/a") is None and number("none") is None


def test_table_is_well_formed():
    assert [c.id for c in AE_CLAIMS] == [f"C{i}" for i in range(1, len(AE_CLAIMS) + 1)]
    assert all(c.checks for c in AE_CLAIMS)
    with pytest.raises(ValueError, match="only Holds checks"):
        Check("e2_sram", "e2.smem_max_kib", Exact(), "smem")  # E2 has no H200 reference
    with pytest.raises(ValueError, match="unknown experiment"):
        Check("e9_nothing", "x", Holds())
    with pytest.raises(ValueError, match="needs a label"):
        Check("e1_throughput", "e1.max_rel_err", Exact())


def test_experiments_agree_with_the_workflow():
    """GPU experiments are those the workflow takes from the H200 reference without a GPU."""
    text = (REPO_ROOT / "workflow/rules/common.smk").read_text()
    gpu = re.findall(r'"(\w+)"', re.search(r"^GPU_EXPERIMENTS = \[(.*?)\]", text, re.M).group(1))
    local = re.findall(r'"(e\d\w*)":', re.search(r"^LOCAL_EXPERIMENTS = \{(.*?)\}", text, re.M).group(1))
    assert {e for e, s in EXPERIMENTS.items() if s.gpu} == set(gpu)
    assert {e for e, s in EXPERIMENTS.items() if not s.gpu} == set(local)


# ---------------------------------------------------------------- the committed references


@pytest.fixture(scope="module")
def references():
    """Every experiment's committed run: the H200 reference, or the CPU run for the local studies."""
    return {exp: Run.load(exp, (H200 if spec.gpu else CPU) / f"{exp}.csv", report_module)
            for exp, spec in EXPERIMENTS.items()}


def test_committed_references_pass_their_own_checks(references):
    """The appendix's expected values are the references': judged against themselves every claim
    must PASS (a check naming a key or claim the reports do not produce, or a claim the reference
    does not support, fails here)."""
    refs = {e: r for e, r in references.items() if EXPERIMENTS[e].gpu}
    judged = judge_all(refs, references)
    failed = {c.id: [(k.key, o.fresh) for k, o in zip(c.checks, out, strict=True) if o.verdict != PASS]
              for c, out in judged if verdict(out) != PASS}
    assert not failed


def test_cpu_run_report_says_not_run_for_gpu_claims(tmp_path):
    pairs = [(exp, CPU / f"{exp}.csv") for exp, spec in EXPERIMENTS.items() if not spec.gpu]
    text = reproduction_report(H200, pairs, report_module)
    rows = dict(re.findall(r"^\| (C\d+) \| [^|]+ \| \*\*([^*]+)\*\* \|", text, re.M))
    assert set(rows) == {c.id for c in AE_CLAIMS}
    for claim in AE_CLAIMS:
        needs_gpu = any(EXPERIMENTS[e].gpu for e in claim.experiments)
        assert rows[claim.id] == ("NOT RUN (needs a GPU)" if needs_gpu else PASS), claim.id
    n_pass = sum(v == PASS for v in rows.values())
    assert f"**{n_pass} of {len(AE_CLAIMS)} claims PASS, 0 FAIL, {len(AE_CLAIMS) - n_pass} NOT RUN.**" in text


def test_artifact_macros_come_from_the_manifests():
    values = artifact_macros(H200, CPU, report_module)
    render_macros(values)  # every key is a valid macro key
    rows = values["ae.times.table"].splitlines()
    assert len(rows) == len(EXPERIMENTS)
    for spec, row in zip(EXPERIMENTS.values(), rows, strict=True):
        cells = [c.strip() for c in row.removesuffix("\\\\").split("&")]
        cpu_s = sum(json.loads((CPU / f"{r}.manifest.json").read_text())["seconds"] for r in spec.runs)
        assert cells[0] == spec.label and cells[4] == f"{cpu_s / 60:.1f}"
        if spec.gpu:
            gpu_s = sum(json.loads((H200 / f"{r}.manifest.json").read_text())["seconds"] for r in spec.runs)
            assert cells[2] == f"{gpu_s / 60:.1f}"
        else:
            assert cells[2] == "--"
    checks = [r for r in values["ae.claims.table"].splitlines() if r != "\\midrule"]
    assert len(checks) == int(values["ae.claims.checks"]) == sum(len(c.checks) for c in AE_CLAIMS)
    assert values["ae.claims.count"] == str(len(AE_CLAIMS))


# ---------------------------------------------------------------- the command line


def test_cli_names_a_malformed_or_unknown_input(tmp_path):
    def run(*inputs):
        return subprocess.run([sys.executable, "-m", "fieldprint.report", "reproduction", str(tmp_path / "r.md"),
                               str(H200), *inputs], capture_output=True, text=True)

    done = run("e6_live")
    assert done.returncode == 2 and "'e6_live': expected <experiment>=<results.csv>" in done.stderr
    done = run(f"e9_nothing={CPU / 'e6_live.csv'}")
    assert done.returncode != 0 and "unknown experiment 'e9_nothing'" in done.stderr
    assert not (tmp_path / "r.md").exists()


# ---------------------------------------------------------------- citation metadata

# The top-level keys of CFF 1.2.0 (its schema allows no others) and the Zenodo deposit fields used.
CFF_KEYS = {"abstract", "authors", "cff-version", "commit", "contact", "date-released", "doi", "identifiers",
            "keywords", "license", "license-url", "message", "preferred-citation", "references", "repository",
            "repository-artifact", "repository-code", "title", "type", "url", "version"}
DATE = re.compile(r"^[0-9]{4}-(0[1-9]|1[012])-(0[1-9]|[12][0-9]|3[01])$")


def test_citation_metadata_is_valid_and_agrees_with_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    cff = yaml.safe_load((REPO_ROOT / "CITATION.cff").read_text())
    zenodo = json.loads((REPO_ROOT / ".zenodo.json").read_text())
    assert set(cff) <= CFF_KEYS and {"authors", "cff-version", "message", "title"} <= set(cff)
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert isinstance(cff["date-released"], str) and DATE.match(cff["date-released"])  # quoted: not a YAML date
    assert cff["authors"] and all(set(a) == {"name"} and a["name"] for a in cff["authors"])  # entities
    assert (cff["title"], cff["version"], cff["license"]) == (project["description"], project["version"],
                                                              project["license"])
    assert (zenodo["title"], zenodo["version"], zenodo["license"]) == (cff["title"], cff["version"], cff["license"])
    assert zenodo["upload_type"] == "software" and zenodo["publication_date"] == cff["date-released"]
    assert zenodo["creators"] == cff["authors"] and zenodo["keywords"] == cff["keywords"]
    assert " ".join(cff["abstract"].split()) == zenodo["description"]
    assert (REPO_ROOT / "LICENSE").read_text().startswith(f"{project['license']} License")
