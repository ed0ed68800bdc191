"""Results files (fieldprint.results): declared columns, checked reads, manifests, and the report
refusing bad data with the file, line and column named. Bad data is made by editing copies of the
committed H200 reference files in a temporary folder."""

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fieldprint.experiments import e0_unfused, e1_throughput, e2_sram, e4_stability, e5_accuracy
from fieldprint.experiments.common import REPO_ROOT, compose, run_and_save
from fieldprint.report import e2_sram as report_e2
from fieldprint.report import latex_escape, render_macros
from fieldprint.report.__main__ import write_claims, write_macros
from fieldprint.report.provenance import environment_macros
from fieldprint.results import (
    SCHEMAS,
    ResultsError,
    atomic_write_text,
    load_results,
    manifest_path,
    read_manifest,
    read_rows,
    write_manifest,
    write_rows,
)

REFERENCE = REPO_ROOT / "data" / "reference" / "h200"
REFERENCE_EXPERIMENTS = sorted(p.stem for p in REFERENCE.glob("*.csv"))
# The fused decode row at B=64, L=4K, 64 anchors, bf16: a number the paper quotes.
E1_KEY = {"impl": "fused", "mode": "decode", "batch": "64", "context": "4096", "anchors": "64",
          "kv_dtype": "bf16"}


def copy_reference(tmp_path: Path, exp: str) -> Path:
    """The reference CSV of ``exp`` and its manifest, copied into tmp_path: the CSV's path."""
    for src in (REFERENCE / f"{exp}.csv", manifest_path(REFERENCE / f"{exp}.csv")):
        shutil.copy(src, tmp_path / src.name)
    return tmp_path / f"{exp}.csv"


def table(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows of fields) of a CSV without quoted commas (the reference files)."""
    lines = path.read_text().splitlines()
    return lines[0].split(","), [line.split(",") for line in lines[1:]]


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> None:
    path.write_text("\n".join(",".join(r) for r in [header, *rows]) + "\n")


def find(header: list[str], rows: list[list[str]], key: dict[str, str]) -> int:
    """Index in ``rows`` of the one row matching ``key``."""
    (i,) = [i for i, r in enumerate(rows) if all(r[header.index(k)] == v for k, v in key.items())]
    return i


def error_of(exp: str, csv_path: Path) -> str:
    with pytest.raises(ResultsError) as err:
        load_results(exp, csv_path)
    return str(err.value)


# ---------------------------------------------------------------- good files


@pytest.mark.parametrize("exp", REFERENCE_EXPERIMENTS)
def test_reference_files_read_back_typed(exp):
    res = load_results(exp, REFERENCE / f"{exp}.csv")
    types = {c.name: c.type for c in SCHEMAS[exp].columns}
    assert res.rows and res.manifest["gpu"] == "NVIDIA H200"
    for row in res.rows:
        assert set(row) == set(types)
        for name, value in row.items():
            assert value is None or type(value) is types[name], (name, value)
            assert not isinstance(value, float) or math.isfinite(value)


def test_round_trip_keeps_text_and_types(tmp_path):
    rows = [{"step": 10, "tokens": 640, "seconds": 1.5, "lr": "1e-3", "train_loss": 2.0,
             "val_loss": 1.9, "val_bpb": 2.7412, "final": False},
            {"step": 20, "tokens": 1280, "seconds": 3.25, "lr": 5e-4, "train_loss": 1.5,
             "val_loss": 1.4, "val_bpb": 2.0198, "final": True}]
    path = tmp_path / "e5_train.csv"
    write_rows(path, rows, SCHEMAS["e5_train"])
    assert path.read_text().splitlines()[1] == "10,640,1.5,1e-3,2.0,1.9,2.7412,False"  # as given
    back = read_rows(path, SCHEMAS["e5_train"])
    assert back[0]["lr"] == 1e-3 and back[1]["final"] is True and back[0]["step"] == 10


# ---------------------------------------------------------------- the corruptions of issue 14


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf"])
def test_non_finite_number_names_file_line_column(tmp_path, bad):
    csv_path = copy_reference(tmp_path, "e1_throughput")
    header, rows = table(csv_path)
    i = find(header, rows, E1_KEY)
    rows[i][header.index("tbps")] = bad
    write_table(csv_path, header, rows)
    msg = error_of("e1_throughput", csv_path)
    assert f"{csv_path}, line {i + 2}, column 'tbps'" in msg and "not a finite number" in msg
    # the number and claims steps stop there, writing nothing
    with pytest.raises(ResultsError, match="'tbps'"):
        write_macros("e1_throughput", csv_path, tmp_path / "e1.tex")
    with pytest.raises(ResultsError, match="'tbps'"):
        write_claims(tmp_path / "claims.md", [f"e1_throughput={csv_path}"])
    assert not (tmp_path / "e1.tex").exists() and not (tmp_path / "claims.md").exists()


def test_empty_number_of_a_run_implementation(tmp_path):
    csv_path = copy_reference(tmp_path, "e1_throughput")
    header, rows = table(csv_path)
    i = find(header, rows, E1_KEY)
    rows[i][header.index("tbps")] = ""
    write_table(csv_path, header, rows)
    msg = error_of("e1_throughput", csv_path)
    assert f"line {i + 2}, column 'tbps': empty" in msg and "where skipped matches ''" in msg


def test_duplicate_row_with_wrong_numbers_placed_first(tmp_path):
    csv_path = copy_reference(tmp_path, "e1_throughput")
    header, rows = table(csv_path)
    i = find(header, rows, E1_KEY)
    fake = list(rows[i])
    fake[header.index("tbps")], fake[header.index("ms")] = "10.00", "0.1075"
    write_table(csv_path, header, [fake, *rows])
    msg = error_of("e1_throughput", csv_path)
    # the original row, now at line i + 3, repeats the key of the fake one at line 2
    assert f"{csv_path}, line {i + 3}: duplicate row: line 2 has the same key" in msg
    assert "impl='fused'" in msg and "context=4096" in msg
    with pytest.raises(ResultsError, match="duplicate row"):
        write_claims(tmp_path / "claims.md", [f"e1_throughput={csv_path}"])


@pytest.mark.parametrize("exp", REFERENCE_EXPERIMENTS)
def test_truncated_mid_line(tmp_path, exp):
    csv_path = copy_reference(tmp_path, exp)
    text = csv_path.read_text()
    cut = text[: len(text) // 2].rstrip("\n")[:-1]  # ends inside a line
    csv_path.write_text(cut)
    assert "truncated" in error_of(exp, csv_path)


# E3 is left out: its rows run largest size first under a time budget, so the config does not
# determine the smaller sizes (the ones a cut at a line boundary removes); the paper quotes the
# largest. Fresh runs of every experiment are pinned by their manifest's digest (below).
@pytest.mark.parametrize("exp", [e for e in REFERENCE_EXPERIMENTS if e != "e3_hash"])
def test_truncated_at_a_line_boundary(tmp_path, exp):
    csv_path = copy_reference(tmp_path, exp)
    lines = csv_path.read_text().splitlines(keepends=True)
    csv_path.write_text("".join(lines[: max(2, len(lines) // 2)]))
    msg = error_of(exp, csv_path)
    # older references are caught by the rows their config asks for, newer ones (whose manifest
    # pins the file) by the row count and digest
    assert "which the config in" in msg or "determines" in msg or "truncated after the run" in msg, msg


def test_header_only_and_empty_files(tmp_path):
    csv_path = copy_reference(tmp_path, "e6_commit")
    csv_path.write_text(csv_path.read_text().splitlines(keepends=True)[0])
    assert "a header but no rows" in error_of("e6_commit", csv_path)
    csv_path.write_text("")
    assert "empty" in error_of("e6_commit", csv_path)


def test_missing_column_is_named(tmp_path):
    csv_path = copy_reference(tmp_path, "e6_commit")
    header, rows = table(csv_path)
    j = header.index("overhead")
    write_table(csv_path, header[:j] + header[j + 1:], [r[:j] + r[j + 1:] for r in rows])
    assert f"{csv_path}, line 1: missing column(s) ['overhead']" in error_of("e6_commit", csv_path)
    with pytest.raises(ResultsError, match="overhead"):
        write_macros("e6_commit", csv_path, tmp_path / "e6.tex")


def test_undeclared_and_repeated_columns(tmp_path):
    csv_path = copy_reference(tmp_path, "e6_commit")
    header, rows = table(csv_path)
    write_table(csv_path, [*header, "extra"], [[*r, "1"] for r in rows])
    assert "undeclared column(s) ['extra']" in error_of("e6_commit", csv_path)
    write_table(csv_path, [*header, "mode"], [[*r, "none"] for r in rows])
    assert "repeated column(s) ['mode']" in error_of("e6_commit", csv_path)


@pytest.mark.parametrize("column, bad, why", [
    ("interval", "four", "'four' is not an integer"),
    ("interval", "1.5", "'1.5' is not an integer"),
    ("overhead", "0.4.1", "'0.4.1' is not a number"),
])
def test_bad_type_is_named(tmp_path, column, bad, why):
    csv_path = copy_reference(tmp_path, "e6_commit")
    header, rows = table(csv_path)
    rows[2][header.index(column)] = bad
    write_table(csv_path, header, rows)
    msg = error_of("e6_commit", csv_path)
    assert f"{csv_path}, line 4, column {column!r}: {why}" in msg


def test_bad_boolean_and_short_row(tmp_path):
    csv_path = copy_reference(tmp_path, "e5_accuracy")
    header, rows = table(csv_path)
    rows[0][header.index("anchors_quantized")] = "yes"
    write_table(csv_path, header, rows)
    assert "line 2, column 'anchors_quantized': 'yes' is not True or False" in error_of("e5_accuracy", csv_path)
    rows[0][header.index("anchors_quantized")] = "False"
    rows[5] = rows[5][:-3]
    write_table(csv_path, header, rows)
    assert f"line 7: {len(header) - 3} fields, the header has {len(header)}" in error_of("e5_accuracy", csv_path)


def test_report_command_line_names_the_problem_without_a_traceback(tmp_path):
    csv_path = copy_reference(tmp_path, "e6_commit")
    header, rows = table(csv_path)
    rows[0][header.index("ms_per_step")] = "nan"
    write_table(csv_path, header, rows)
    out = tmp_path / "e6.tex"
    done = subprocess.run([sys.executable, "-m", "fieldprint.report", "macros", "e6_commit", str(csv_path),
                           str(out)], capture_output=True, text=True)
    assert done.returncode != 0 and not out.exists()
    assert f"{csv_path}, line 2, column 'ms_per_step'" in done.stderr and "Traceback" not in done.stderr


# ---------------------------------------------------------------- manifests


def test_manifest_fields_are_checked(tmp_path):
    csv_path = copy_reference(tmp_path, "e1_throughput")
    mpath = manifest_path(csv_path)
    manifest = json.loads(mpath.read_text())
    for broken, why in (({**manifest, "gpu": 200}, "'gpu' must be str or null"),
                        ({k: v for k, v in manifest.items() if k != "date"}, "'date' is missing"),
                        ({**manifest, "cpu_count": True}, "'cpu_count' must be int"),
                        ([manifest], "must be a JSON object")):
        mpath.write_text(json.dumps(broken))
        assert f"{mpath}:" in error_of("e1_throughput", csv_path) and why in error_of("e1_throughput", csv_path)
    mpath.write_text("{")
    assert "cannot read the manifest" in error_of("e1_throughput", csv_path)
    mpath.write_text(json.dumps({**manifest, "config": {**manifest["config"], "impls": 3}}))
    assert "the config lacks or mistypes" in error_of("e1_throughput", csv_path)
    with pytest.raises(ResultsError, match="'seconds' must be int or float"):
        write_manifest(tmp_path / "m.json", {**manifest, "seconds": "1"})
    assert not (tmp_path / "m.json").exists()


def test_fresh_run_is_pinned_by_its_manifest(tmp_path):
    """A run records its CSV's row count and SHA-256: a valid-looking edit is refused too."""
    cfg = e0_unfused.E0Config(out_dir=str(tmp_path), contexts=[32, 64], anchors=16, q_len=4, heads_q=2,
                              heads_kv=1, head_dim=16, rep_ms=1, device="cpu")
    run_and_save("e0_unfused", cfg, e0_unfused.run)
    csv_path = tmp_path / "e0_unfused.csv"
    manifest = read_manifest(manifest_path(csv_path))
    assert manifest["rows"] == 6 and len(load_results("e0_unfused", csv_path).rows) == 6
    header, rows = table(csv_path)
    rows[0][header.index("ms")] = "0.001"
    write_table(csv_path, header, rows)
    assert "not the one its run wrote" in error_of("e0_unfused", csv_path)


# ---------------------------------------------------------------- writing


def test_write_rejects_what_a_read_would_reject(tmp_path):
    schema = SCHEMAS["e5_train"]
    good = {"step": 1, "tokens": 2, "seconds": 0.1, "lr": 0.1, "train_loss": 1.0, "val_loss": 1.0,
            "val_bpb": 1.4, "final": True}
    path = tmp_path / "e5_train.csv"
    for rows, why in (([{**good, "train_loss": float("nan")}], "row 0 (line 2), column 'train_loss'"),
                      ([{**good, "extra": 1}], "columns ['extra'] that the e5_train schema"),
                      ([{**good, "val_bpb": None}], "column 'val_bpb': empty"),
                      ([good, {**good, "seconds": 9.0}], "duplicate row"),
                      ([], "no rows")):
        with pytest.raises(ResultsError, match=re.escape(why)):
            write_rows(path, rows, schema)
    assert not path.exists()


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "out.txt"
    atomic_write_text(path, "old")

    def boom(*_):
        raise OSError("disk full")

    monkeypatch.setattr("fieldprint.results.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


# ---------------------------------------------------------------- expected rows = the experiments' loops


def canonical(rows: list[dict]) -> list[tuple]:
    return sorted(tuple(sorted(r.items())) for r in rows)


def manifest_of(cfg, gpu="NVIDIA H200") -> dict:
    return {"config": dataclasses.asdict(cfg), "gpu": gpu}


@pytest.mark.parametrize("scale", ["smoke", "paper"])
def test_expected_rows_follow_the_experiment_loops(scale):
    cfg = compose("e1_throughput", e1_throughput.E1Config, [f"scale={scale}"])
    want = [{"mode": m, "batch": b, "q_len": q, "context": L, "anchors": a, "kv_dtype": kv, "impl": i}
            | ({"share_group": g} if m.startswith("shared_") else {})
            for m, b, q, L, a, kv, g in e1_throughput._configs(cfg) for i in cfg.impls]
    modes = {m for m, *_ in e1_throughput._configs(cfg)}
    assert {"shared_decode", "shared_prefill"} <= modes
    assert SCHEMAS["e1_throughput"].expected(manifest_of(cfg)) == want

    cfg = compose("e5_accuracy", e5_accuracy.E5AccuracyConfig, [f"scale={scale}"])
    names = ("fmt", "rounding", "anchors_quantized", "seed")
    lm = [dict(zip(names, r, strict=True), kind="lm", attention=cfg.attention)
          for r in e5_accuracy._runs(cfg, cfg.formats)]
    lm += [dict(zip(names, r, strict=True), kind="lm", attention="kernel")
           for r in e5_accuracy._runs(cfg, cfg.kernel_formats)]
    attn = [dict(zip(names, r, strict=True), kind="attention", attention="reference")
            for r in e5_accuracy._runs(cfg, cfg.formats)]
    got = SCHEMAS["e5_accuracy"].expected(manifest_of(cfg))
    assert got[0]["fmt"] == "reference" and canonical(got[1:]) == canonical(lm + attn)

    cfg = compose("e2_sram", e2_sram.E2Config, [f"scale={scale}"])
    variants = [{"mode": m, "head_dim": d, "kv_dtype": kv, "block_size": bs, "group": g,
                 "varied": ",".join(f"{k}={v}" for k, v in over.items()) or None}
                for m, d, kv, bs, g, over in e2_sram._variants(cfg)]
    got = [{k: r[k] for k in variants[0]} for r in SCHEMAS["e2_sram"].expected(manifest_of(cfg))
           if r["kind"] == "variant"]
    assert got == variants


def test_e4_run_satisfies_its_expected_rows(tmp_path):
    """A CPU run, written and read back: its skips and bf16-only variants match the schema."""
    cfg = e4_stability.E4Config(out_dir=str(tmp_path), tokens=32, d_model=64, heads_kv=2, head_dim=32,
                                block_sizes=[8], out_dtypes=["bfloat16", "float32"],
                                variants=["rehash", "split_k2_fwd", "bf16_gemm", "tf32"], triton_tokens=0,
                                cases=["e4m3/rne", "e4m3/two_grid"], device="cpu")
    run_and_save("e4_stability", cfg, e4_stability.run)
    res = load_results("e4_stability", tmp_path / "e4_stability.csv")
    assert {r["status"] for r in res.rows if r["variant"] == "tf32"} == {"skipped: needs CUDA"}


# ---------------------------------------------------------------- strings that reach LaTeX

HOSTILE = "NVIDIA H200 100% & R&D #1 {x}_y $z$ ~a^b \\fpdef{env.gpu}{H100}"


def test_latex_escape_every_special():
    assert latex_escape("%&#_${}") == r"\%\&\#\_\$\{\}"
    assert latex_escape("\\~^") == r"\textbackslash{}\textasciitilde{}\textasciicircum{}"
    assert latex_escape("a\n\nb") == "a  b"  # a blank line would end the macro argument's paragraph


def test_csv_cell_cannot_inject_a_macro():
    """A string cell that reaches the paper (E2's table) carries a \\fpdef: it is printed, not run."""
    variant = {"kind": "variant", "kernel": "attention", "mode": "decode", "head_dim": 128,
               "kv_dtype": "bf16", "varied": "tile_n=32}\\fpdef{e2.variants}{99", "block_m": 16,
               "tile_n": 64, "shared_bytes": 36864, "model_bytes": 36864, "model_ratio": 1.0,
               "registers": 128, "spill_stores": 0, "spill_loads": 0, "block_size": 16, "group": 4}
    values = report_e2.macros([variant], {"config": {"block_size": 16, "group": 4}})
    text = render_macros(values)
    assert text.count("\\fpdef{") == len(values)  # one definition per key, none injected
    assert "$T_N$ 32\\}\\textbackslash{}fpdef\\{e2.variants\\}\\{99" in values["e2.table"]


def test_hostile_gpu_name_builds(tmp_path):
    """A GPU name with LaTeX specials, through the environment macros, compiles with pdfLaTeX."""
    if shutil.which("pdflatex") is None:
        pytest.skip("pdflatex missing: `make setup` installs TeX Live")
    manifest = json.loads(manifest_path(REFERENCE / "e1_throughput.csv").read_text())
    write_manifest(tmp_path / "gpu.manifest.json", {**manifest, "gpu": HOSTILE})
    values = environment_macros(tmp_path / "gpu.manifest.json", tmp_path / "gpu.manifest.json")
    (tmp_path / "env.tex").write_text(render_macros(values))
    # the paper's \fpdef stores a value per key; \fp prints it
    (tmp_path / "doc.tex").write_text(
        "\\documentclass{article}\n"
        "\\newcommand{\\fpdef}[2]{\\expandafter\\def\\csname fp@#1\\endcsname{#2}}\n"
        "\\newcommand{\\fp}[1]{\\csname fp@#1\\endcsname}\n"
        "\\input{env.tex}\n\\begin{document}GPU: \\fp{env.gpu}.\\end{document}\n")
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                          cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:]
    assert values["env.gpu"] == latex_escape(HOSTILE)
    assert (tmp_path / "doc.pdf").stat().st_size > 0


def test_rows_a_run_cannot_write_are_kept(tmp_path):
    cfg = e0_unfused.E0Config(out_dir=str(tmp_path), contexts=[32], rep_ms=1, device="cpu")
    with pytest.raises(ResultsError, match="'ms': 'nan' is not a finite number.*rejected.json"):
        run_and_save("e0_unfused", cfg, lambda c: [{**r, "ms": float("nan")} for r in e0_unfused.run(c)])
    kept = json.loads((tmp_path / "e0_unfused.rejected.json").read_text())
    assert len(kept) == 3 and not (tmp_path / "e0_unfused.csv").exists()
