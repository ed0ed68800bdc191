"""E6 report, claims and figure (fieldprint.report.e6_commit, fieldprint.plots.e6_commit) on
hand-made rows: the new schema (graph-captured baseline, two batch sizes, quartiles, per-commit
costs, the commit path) with the targets met and missed, a CPU run, and rows of the first H200
run's schema (none of the new columns); then the committed H200 reference, whose verdicts are
recomputed here from its rows. Every \\fp{e6...} key the paper uses must be defined for both
schemas."""

import json
import re

import pytest

from fieldprint.experiments.common import REPO_ROOT
from fieldprint.plots import e6_commit as plot
from fieldprint.report import e6_commit as rep
from fieldprint.report import render_macros
from fieldprint.report.__main__ import write_claims, write_macros
from fieldprint.results import SCHEMAS, load_results, write_manifest, write_rows

REFERENCE_CSV = REPO_ROOT / "data" / "reference" / "h200" / "e6_commit.csv"
H200 = {"gpu": "NVIDIA H200", "date": "2026-11-30T12:00:00+00:00", "cpu_count": 16}
CPU = {"gpu": None, "date": "2026-11-30T12:00:00+00:00", "cpu_count": 2}
BASE_MS = {16: 4.0, 64: 10.0}
INTERVALS = (1, 4, 16, 64)
# overhead of every mode: per-step modes and commit_sync alike at both batch sizes
PER_STEP_OVERHEAD = {"per_step_copy_cpu": 0.70, "per_step_gpu": 0.40}
SYNC_OVERHEAD = {1: 0.05, 4: 0.02, 16: 0.012, 64: 0.004}


def _timing(batch, mode, interval, overhead, spread=0.002, device="cuda", graphs=True, commit=None):
    """One new-schema timing row: median overhead ``overhead``, quartiles ``spread`` either side
    (in overhead units), and for the commit modes ``commit`` = (host ms, GPU ms, launches, path)."""
    base = BASE_MS[batch]
    ms = base * (1 + overhead)
    host_ms, gpu_ms, launches, path = commit if commit else (None, None, None, None)
    return {
        "kind": "timing", "mode": mode, "interval": interval, "batch": batch, "context": 4096, "anchors": 64,
        "layers": 8, "steps": 512, "reps": 5, "dtype": "bfloat16", "attention": "kernel", "graphs": graphs,
        "sync": False, "device": device, "ms_per_step": ms, "ms_min": ms * 0.99,
        "ms_q1": base * (1 + overhead - spread), "ms_q3": base * (1 + overhead + spread), "ms_max": ms * 1.01,
        "tokens_per_s": batch * 1e3 / ms, "overhead": overhead, "overhead_q1": overhead - spread,
        "overhead_q3": overhead + spread, "commits": 512 // interval if mode.startswith("commit") else 0,
        "d2h_bytes_per_step": 512.0, "commit_host_ms": host_ms, "launches_per_commit": launches,
        "commit_gpu_ms": gpu_ms, "path": path,
    }


def new_rows(async_i16=None, async_i1=None, device="cuda", graphs=True, path="fused"):
    """H200-like rows at batch 16 and 64; ``async_i16`` / ``async_i1``: {batch: overhead} of the
    asynchronous commit at interval 16 / 1 (defaults: every target met)."""
    async_i16 = async_i16 or {16: 0.006, 64: 0.008}
    async_i1 = async_i1 or {16: 0.02, 64: 0.025}
    rows = []
    for b in BASE_MS:
        rows.append(_timing(b, "none", 1, 0.0, spread=0.001, device=device, graphs=graphs))
        for mode, o in PER_STEP_OVERHEAD.items():
            rows.append(_timing(b, mode, 1, o, device=device, graphs=graphs))
        for mode in rep.COMMIT:
            for i in INTERVALS:
                o = SYNC_OVERHEAD[i] if mode == "commit_sync" else {1: async_i1[b], 16: async_i16[b]}.get(i, 0.004)
                gpu = (0.05 * b / 16 * max(i, 4) / 16 if device == "cuda" else None)  # grows with the pages
                commit = (0.08 + 0.001 * i, gpu, 3 if device == "cuda" else None, path)
                rows.append(_timing(b, mode, i, o, device=device, graphs=graphs, commit=commit))
    for target in ("anchor", "context"):
        rows.append({"kind": "tamper", "mode": "commit_sync", "batch": 16, "context": 4096, "layers": 8,
                     "target": target, "field": "codes", "flips": 32, "detected": 32, "localized": 32,
                     "leaves": 67664, "false_positive": 0})
    return rows


OLD_FIELDS = ("overhead_q1", "overhead_q3", "commit_host_ms", "launches_per_commit", "commit_gpu_ms", "path")


def old_rows():
    """Rows as the first H200 run wrote them: one batch size, an eager loop, two repetitions, none
    of the quartile and per-commit columns."""
    rows = [r for r in new_rows(async_i16={16: 0.1429, 64: 0.1}) if r.get("batch") == 16]
    for r in rows:
        if r["kind"] == "timing":
            r.update({f: None for f in OLD_FIELDS}, graphs=False, reps=2, steps=128)
    return rows


def reference():
    rows = load_results("e6_commit", REFERENCE_CSV).rows
    return rows, json.loads(REFERENCE_CSV.with_name("e6_commit.manifest.json").read_text())


def _claims(rows, manifest):
    return {c.id: c for c in rep.claims(rows, manifest)}


def paper_keys() -> set[str]:
    """Every \\fp{e6.*} key the paper's sources use."""
    found = set()
    for tex in (REPO_ROOT / "paper").rglob("*.tex"):
        if "generated" not in tex.parts:
            found |= set(re.findall(r"\\fp\{(e6\.[^}]*)\}", tex.read_text()))
    return found


def test_new_schema_macros_every_batch_mode_and_interval():
    m = rep.macros(new_rows(), H200)
    assert m["e6.batches"] == "16 and 64" and m["e6.where"] == "NVIDIA H200"
    assert m["e6.baseline"] == "graph-captured" and m["e6.path"] == "fused"
    for b in BASE_MS:
        assert m[f"e6.b{b}.none.ms_per_step"] == f"{BASE_MS[b]:.2f}"
        assert m[f"e6.b{b}.none.tokens_per_s"] == f"{b * 1e3 / BASE_MS[b]:,.0f}".replace(",", "{,}")
        for mode in rep.PER_STEP:
            assert m[f"e6.b{b}.{mode}.overhead_pct"] == f"{100 * PER_STEP_OVERHEAD[mode]:.2f}"
        for mode in rep.COMMIT:
            for i in INTERVALS:
                k = f"e6.b{b}.{mode}.i{i}"
                for field in ("overhead_pct", "overhead_iqr", "commit_host_ms", "commit_gpu_ms", "launches",
                              "ms_per_commit", "path", "tokens_per_s"):
                    assert m[f"{k}.{field}"] != "n/a", f"{k}.{field}"
    k = "e6.b64.commit_async.i16"
    assert m[f"{k}.overhead_pct"] == "0.80" and m[f"{k}.overhead_iqr"] == "0.60--1.00"
    assert m[f"{k}.commit_gpu_ms"] == f"{0.05 * 4:.3f}" and m[f"{k}.launches"] == "3"
    assert m[f"{k}.commit_host_ms"] == "0.096" and m[f"{k}.path"] == "fused"
    assert m[f"{k}.ms_per_commit"] == f"{10.0 * 0.008 * 16:.3f}"  # per-step overhead x 16 steps
    # ranges over the batch sizes, and the worst batch
    assert m["e6.all.commit_async.i16.commit_gpu_ms"] == "0.050--0.200"
    assert m["e6.all.commit_async.i16.launches"] == "3"
    assert m["e6.all.per_step_copy_cpu.slowdown"] == "1.70"
    assert m["e6.worst.commit_async.i16.batch"] == "64" and m["e6.worst.commit_async.i16.overhead_pct"] == "0.80"
    assert m["e6.worst.commit_async.i1.batch"] == "64" and m["e6.worst.commit_async.i1.overhead_iqr"] == "2.30--2.70"
    assert m["e6.verdict.async_i16"] == m["e6.verdict.async_i1"] == "met"
    assert m["e6.target.async_i16_pct"] == "1" and m["e6.target.async_i1_pct"] == "3"
    # the table: one line per batch, mode and interval, a rule between the batch sizes
    lines = m["e6.table"].split("\n")
    assert lines.count("\\midrule") == 1 and len(lines) == 2 * (3 + 2 * len(INTERVALS)) + 1
    assert "64 & commit, side stream & 16 & 10.08 & 0.80 & 0.60--1.00 & 0.096 & 0.200 & 3 \\\\" in lines
    render_macros(m)  # every key is a valid macro key


def test_new_schema_claims_met():
    claims = _claims(new_rows(), H200)
    assert claims["commit.async_overhead"].supported and claims["commit.async_overhead_every_step"].supported
    ev = claims["commit.async_overhead"].evidence
    assert ev.startswith("target met: worst batch 64: 0.80% (IQR 0.60% to 1.00%)") and "graph-captured" in ev
    assert claims["commit.latency_ms"].supported
    assert "batch 16: 0.050 ms GPU" in claims["commit.latency_ms"].evidence
    assert "batch 64: 0.200 ms GPU, 0.096 ms host, 3 launches, fused path" in claims["commit.latency_ms"].evidence
    assert claims["commit.per_step_copy"].supported and claims["commit.tamper_detection"].supported


def test_targets_missed_at_one_batch_size_name_that_batch():
    rows = new_rows(async_i16={16: 0.004, 64: 0.013}, async_i1={16: 0.031, 64: 0.02})
    claims = _claims(rows, H200)
    assert not claims["commit.async_overhead"].supported
    assert claims["commit.async_overhead"].evidence.startswith("target missed: worst batch 64: 1.30% "
                                                               "(IQR 1.10% to 1.50%)")
    assert not claims["commit.async_overhead_every_step"].supported
    assert "worst batch 16: 3.10%" in claims["commit.async_overhead_every_step"].evidence
    m = rep.macros(rows, H200)
    assert m["e6.verdict.async_i16"] == m["e6.verdict.async_i1"] == "missed"
    assert m["e6.worst.commit_async.i1.batch"] == "16"
    # exactly at the target is met
    at = _claims(new_rows(async_i16={16: 0.01, 64: 0.01}), H200)
    assert at["commit.async_overhead"].supported


def test_no_claim_supported_off_a_gpu_or_without_the_graph_captured_baseline():
    cpu = new_rows(device="cpu", path="unfused")
    for rows, manifest in ((cpu, CPU), (cpu, H200), (new_rows(), CPU)):
        claims = _claims(rows, manifest)
        for cid in ("commit.async_overhead", "commit.async_overhead_every_step", "commit.latency_ms",
                    "commit.per_step_copy"):
            assert not claims[cid].supported, cid
        assert "CPU" in claims["commit.async_overhead"].evidence
        assert rep.macros(rows, manifest)["e6.verdict.async_i16"] == "not tested"
    m = rep.macros(cpu, CPU)
    assert m["e6.b16.commit_async.i16.commit_gpu_ms"] == "n/a" and m["e6.b16.commit_async.i16.launches"] == "n/a"
    assert m["e6.where"] == "CPU" and m["e6.path"] == "unfused"
    eager = _claims(new_rows(graphs=False), H200)
    assert not eager["commit.async_overhead"].supported
    assert "not the target's baseline" in eager["commit.async_overhead"].evidence
    assert rep.macros(new_rows(graphs=False), H200)["e6.baseline"] == "eager (not graph-captured)"
    # measured on the GPU, but not on the fused path: the latency claim is not the fused commit's
    unfused = _claims(new_rows(path="unfused"), H200)["commit.latency_ms"]
    assert not unfused.supported and "not the fused commit path" in unfused.evidence


def test_old_schema_reference_new_values_na_and_targets_not_tested():
    rows = old_rows()
    m = rep.macros(rows, {"gpu": "NVIDIA H200"})
    assert m["e6.batches"] == "16" and m["e6.path"] == "n/a" and m["e6.baseline"] == "eager (not graph-captured)"
    for field in ("overhead_iqr", "commit_host_ms", "commit_gpu_ms", "launches", "path"):
        assert m[f"e6.b16.commit_async.i16.{field}"] == "n/a", field
    assert m["e6.b16.commit_async.i16.overhead_pct"] == "14.29"  # the old median is still reported
    assert m["e6.verdict.async_i16"] == "not tested"
    claims = _claims(rows, {"gpu": "NVIDIA H200"})
    assert not claims["commit.async_overhead"].supported and not claims["commit.latency_ms"].supported
    assert "no quartiles" in claims["commit.async_overhead"].evidence
    assert claims["commit.tamper_detection"].supported


def test_committed_reference_verdicts_follow_from_its_rows():
    """The committed H200 run: the verdicts and the latency claim, recomputed from the CSV."""
    rows, manifest = reference()
    m, claims = rep.macros(rows, manifest), _claims(rows, manifest)
    timing = [r for r in rows if r["kind"] == "timing"]
    # the paper's configuration: graph-captured, at least 5 repetitions of 256 steps or more
    assert manifest["gpu"] and all(r["graphs"] and r["reps"] >= 5 and r["steps"] >= 256 for r in timing)
    for interval, target in rep.TARGETS.items():
        worst = max(r["overhead"] for r in timing if r["mode"] == "commit_async" and r["interval"] == interval)
        expected = "met" if worst <= target else "missed"
        assert m[f"e6.verdict.async_i{interval}"] == expected, interval
        claim = {16: "commit.async_overhead", 1: "commit.async_overhead_every_step"}[interval]
        assert claims[claim].supported == (expected == "met")
        assert m[f"e6.worst.commit_async.i{interval}.overhead_pct"] == f"{100 * worst:.2f}"
    assert claims["commit.latency_ms"].supported and m["e6.path"] == "fused"
    assert claims["commit.tamper_detection"].supported


def test_negative_overheads_print_a_minus_sign():
    rows = new_rows(async_i16={16: -0.004, 64: 0.002})
    m = rep.macros(rows, H200)
    assert m["e6.b16.commit_async.i16.overhead_pct"] == "$-$0.40"
    assert m["e6.b16.commit_async.i16.overhead_iqr"] == "$-$0.60--$-$0.20"
    assert m["e6.all.commit_async.i16.overhead_pct"] == "$-$0.40--0.20"


def test_every_paper_key_is_defined_for_new_and_old_data():
    keys = paper_keys()
    assert "e6.table" in keys and "e6.verdict.async_i16" in keys  # the section uses the new keys
    for rows, manifest in ((new_rows(), H200), (old_rows(), {"gpu": "NVIDIA H200"}),
                           (new_rows(device="cpu", path="unfused"), CPU)):
        assert not keys - set(rep.macros(rows, manifest)), manifest


def _write(tmp_path, rows, manifest):
    """rows as a results CSV with a manifest whose config asks for exactly these rows."""
    csv_path = tmp_path / "e6_commit.csv"
    write_rows(csv_path, rows, SCHEMAS["e6_commit"])
    ref = json.loads(REFERENCE_CSV.with_name("e6_commit.manifest.json").read_text())
    config = {**ref["config"], "batches": sorted(BASE_MS), "reps": 5, "steps": 512, "graphs": True}
    config.pop("batch", None)  # a key of the first run's config
    ref = {k: v for k, v in ref.items() if k not in ("csv_sha256", "rows")}  # the reference CSV's
    write_manifest(tmp_path / "e6_commit.manifest.json", {**ref, **manifest, "config": config})
    return csv_path


def test_report_command_writes_macros_and_claims_from_a_new_schema_csv(tmp_path):
    csv_path = _write(tmp_path, new_rows(async_i16={16: 0.004, 64: 0.013}), {"gpu": "NVIDIA H200"})
    write_macros("e6_commit", csv_path, tmp_path / "e6.tex")
    tex = (tmp_path / "e6.tex").read_text()
    assert "\\fpdef{e6.verdict.async_i16}{missed}" in tex and "\\fpdef{e6.verdict.async_i1}{met}" in tex
    write_claims(tmp_path / "claims.md", [f"e6_commit={csv_path}"])
    md = (tmp_path / "claims.md").read_text()
    assert "**NOT SUPPORTED** `commit.async_overhead`" in md
    assert "**SUPPORTED** `commit.async_overhead_every_step`" in md
    assert "**SUPPORTED** `commit.latency_ms`" in md


@pytest.mark.parametrize("rows, manifest, panels", [
    (new_rows(), H200, 2),
    (old_rows(), H200, 1),
    ([r for r in new_rows(device="cpu", path="unfused") if r.get("interval") != 64], CPU, 2),
])
def test_figure_draws_a_panel_per_batch_size(tmp_path, monkeypatch, rows, manifest, panels):
    drawn, save = {}, plot.save

    def keep(fig, out_stem):  # the figure's axes, then the real save
        drawn["axes"] = list(fig.axes)
        save(fig, out_stem)

    monkeypatch.setattr(plot, "save", keep)
    plot.draw(rows, manifest, tmp_path / "e6")
    assert (tmp_path / "e6.png").stat().st_size > 0 and (tmp_path / "e6.pdf").stat().st_size > 0
    axes = drawn["axes"]
    assert len(axes) == 2 * panels  # every mode above, the commit modes near the targets below
    top, zoom = axes[:panels], axes[panels:]
    batches = sorted({r["batch"] for r in rows if r["kind"] == "timing"})
    assert [ax.get_title() for ax in top] == [f"batch {b}" for b in batches]
    for ax in axes:
        assert ax.get_yscale() == "linear"
        lo, hi = ax.get_ylim()
        assert lo <= 0 and hi >= 3  # the targets are on the scale
    assert all(ax.get_ylim() == plot.ZOOM_PCT for ax in zoom)


def test_zoom_row_labels_points_above_its_range(tmp_path, monkeypatch):
    """A commit overhead above the bottom row's range is a marker at its top edge with the value."""
    texts, save = [], plot.save

    def keep(fig, out_stem):
        texts.extend(t.get_text() for ax in fig.axes[2:] for t in ax.texts)
        save(fig, out_stem)

    monkeypatch.setattr(plot, "save", keep)
    plot.draw(new_rows(async_i1={16: 0.404, 64: 0.02}), H200, tmp_path / "e6")
    assert "40%" in texts  # async at interval 1, batch 16
    assert texts.count("40%") == 1


def test_figure_names_per_step_modes_beyond_the_axis(tmp_path, monkeypatch):
    """New data: commit overheads of a few percent, per-step modes at +70% and +40% are off the
    linear scale, so each panel says their values instead of squashing the axis."""
    texts, limits, save = [], [], plot.save

    def keep(fig, out_stem):
        texts.extend(t.get_text() for ax in fig.axes[:2] for t in ax.texts)
        limits.extend(ax.get_ylim() for ax in fig.axes[:2])
        save(fig, out_stem)

    monkeypatch.setattr(plot, "save", keep)
    plot.draw(new_rows(), H200, tmp_path / "e6")
    assert len(texts) == 2
    assert all("per-step copy + CPU hash: +70.0% (off scale)" in t and
               "per-step GPU hash (sync): +40.0% (off scale)" in t for t in texts)
    assert all(hi < 40 for _, hi in limits)  # the axis is the commit modes', not squashed to +70%
