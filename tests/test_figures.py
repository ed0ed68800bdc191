"""Figures E0, E1, E2, E5 at print size (fieldprint.plots), and the labels of E2's table
(fieldprint.report.e2_sram): what a reader of the printed paper must be able to see."""

from __future__ import annotations

import re

import pytest

from fieldprint.experiments import e2_sram as e2_experiment
from fieldprint.experiments.common import REPO_ROOT
from fieldprint.plots import e0_unfused, e1_throughput, e2_sram, e5_accuracy, style
from fieldprint.report import e2_sram as e2_report
from fieldprint.results import load_results

REFERENCE = REPO_ROOT / "data" / "reference" / "h200"
MANIFEST = {"gpu": None, "cpu_count": 2, "date": "2026-11-30T00:00:00"}


def _capture(monkeypatch, module):
    """Run ``module.draw`` through the real :func:`style.save`, keeping the figure to inspect."""
    figs = []

    def keep(fig, out_stem):
        figs.append(fig)
        style.save(fig, out_stem)

    monkeypatch.setattr(module, "save", keep)
    return figs


def _media_box_inches(pdf) -> tuple[float, float]:
    box = re.search(rb"/MediaBox\s*\[\s*0 0 ([\d.]+) ([\d.]+)\s*\]", pdf.read_bytes())
    assert box, "no MediaBox in the PDF"
    return float(box[1]) / 72, float(box[2]) / 72


def _legend_labels(fig) -> set[str]:
    legends = fig.legends + [ax.get_legend() for ax in fig.get_axes() if ax.get_legend()]
    return {t.get_text() for leg in legends for t in leg.get_texts()}


def _check_printed(fig, pdf, width):
    """The file is the printed size and no text in it is below the minimum size."""
    assert _media_box_inches(pdf)[0] == pytest.approx(width, abs=0.01)
    sizes = [t.get_fontsize() for t in style.visible_texts(fig)]
    assert sizes and min(sizes) >= style.MIN_FONT_PT


def test_printed_figure_keeps_its_size_and_refuses_small_text(tmp_path):
    fig = style.printed_figure(height=2.0)
    ax = fig.subplots()
    ax.set_xlabel("a label much wider than the axes would be without a layout" * 2)
    style.save(fig, tmp_path / "ok")
    assert _media_box_inches(tmp_path / "ok.pdf") == pytest.approx((style.COLUMN_WIDTH, 2.0), abs=0.01)

    fig = style.printed_figure(height=2.0, wide=True)
    fig.subplots().set_title("tiny", fontsize=5)
    with pytest.raises(ValueError, match="below 7 pt.*'tiny' \\(5 pt\\)"):
        style.save(fig, tmp_path / "small")
    assert not (tmp_path / "small.pdf").exists()
    with pytest.raises(ValueError, match="height"):
        style.printed_figure(height=0)
    with pytest.raises(ValueError, match="'v3' has no style"):
        style.implementation("v3")


def test_no_internal_names_in_labels():
    labels = [look.label for look in style.IMPLEMENTATIONS.values()]
    assert len(set(labels)) == len(labels)
    assert not [lab for lab in labels if "v2" in lab or "_" in lab]
    colors = [look.color for look in style.IMPLEMENTATIONS.values()]
    assert len(set(colors)) == len(colors)  # bar charts show colour alone: no two implementations share one


def test_e1_categories_unjoined_axes_from_zero_legend_complete(tmp_path, monkeypatch):
    res = load_results("e1_throughput", REFERENCE / "e1_throughput.csv")
    figs = _capture(monkeypatch, e1_throughput)
    e1_throughput.draw(res.rows, res.manifest, tmp_path / "e1")
    (fig,) = figs
    by_shape, *vs_anchors, shared = fig.get_axes()
    # one bar per measured bf16 shared-prefix row of the panel's implementations
    assert len(shared.patches) == len(e1_throughput.shared_bandwidth(res.rows)) > 0
    # shapes are categories: a line may only be one point or a vertical separator between them
    for line in by_shape.get_lines():
        xs = list(line.get_xdata())
        assert len(xs) == 1 or len(set(xs)) == 1 or line.get_linestyle() == "None", xs
    assert len(vs_anchors) == 4
    for ax in vs_anchors:
        assert ax.get_ylim()[0] == 0
        # fused, cascade, prefix blocks, FlashInfer's paged decode, cuDNN at 0 / 64 / 1K anchors
        assert len(ax.patches) == 5 * 3
    shown = {r["impl"] for r in res.rows if r["mode"] in ("decode", "shared_decode") and r["kv_dtype"] == "bf16"
             and r["tbps"] is not None}
    want = {style.implementation(i).label for i in shown} | {"cuDNN SDPA level (top left)",
                                                             "over logical bytes (bottom)"}
    assert _legend_labels(fig) == want
    _check_printed(fig, tmp_path / "e1.pdf", style.TEXT_WIDTH)


def test_e1_interquartile_bars_where_the_rows_record_quartiles(tmp_path, monkeypatch):
    """Decode rows with the quartiles of their repetitions get a vertical bar from the bandwidth
    at the third quartile of the time to that at the first; rows without them (older files) none."""
    rows = [{"mode": "decode", "kv_dtype": "bf16", "impl": "fused", "batch": 2, "context": 40, "anchors": 16,
             "tbps": 2.0, "ms": 1.0, "ms_q1": 0.8, "ms_q3": 1.25},
            {"mode": "decode", "kv_dtype": "bf16", "impl": "cascade", "batch": 2, "context": 40, "anchors": 16,
             "tbps": 1.0, "ms": 2.0}]
    assert e1_throughput.decode_spread(rows) == {("fused", 2, 40, 16): (1.6, 2.5)}
    figs = _capture(monkeypatch, e1_throughput)
    e1_throughput.draw(rows, MANIFEST, tmp_path / "e1")
    by_shape = figs[0].get_axes()[0]
    (bars,) = [c for c in by_shape.collections if c.get_segments()]
    ((x0, lo), (x1, hi)), = bars.get_segments()
    assert x0 == x1 and (lo, hi) == pytest.approx((1.6, 2.5))


def test_e1_one_shape_one_anchor_count(tmp_path, monkeypatch):
    """A smoke run's rows (one shape, one anchor count) draw: one panel per shape, here one."""
    rows = [{"mode": "decode", "kv_dtype": "bf16", "impl": impl, "batch": 2, "context": 40, "anchors": 16,
             "tbps": tbps} for impl, tbps in (("fused", 0.002), ("cascade", 0.001), ("naive", 0.0005))]
    figs = _capture(monkeypatch, e1_throughput)
    e1_throughput.draw(rows, MANIFEST, tmp_path / "e1")
    by_shape, vs_anchors, shared = figs[0].get_axes()
    assert not shared.patches
    assert len(vs_anchors.patches) == 2  # fused and cascade at 16 anchors; naive is not a strong baseline
    assert _legend_labels(figs[0]) == {style.implementation(r["impl"]).label for r in rows}  # no ceiling
    with pytest.raises(ValueError, match="no measured decode rows"):
        e1_throughput.draw([dict(r, tbps=None) for r in rows], MANIFEST, tmp_path / "none")


def _shared_row(impl, shape, unique, logical):
    B, L, A, group = shape
    return {"mode": "shared_decode", "kv_dtype": "bf16", "impl": impl, "batch": B, "context": L, "anchors": A,
            "share_group": group, "unique_tbps": unique, "tbps": logical}


def test_e1_shared_prefix_panel(tmp_path, monkeypatch):
    """Shared-prefix rows: per shape one bar per implementation at its unique TB/s, rising from the
    log axis' floor, and a tick at its logical TB/s; skipped and non-shared rows are not drawn."""
    res = load_results("e1_throughput", REFERENCE / "e1_throughput.csv")
    a, b = (32, 2048, 8192, 32), (128, 1024, 2048, 16)
    rows = [r for r in res.rows if r["mode"] != "shared_decode"] + [
        _shared_row("fused", a, 1.0, 4.4), _shared_row("fused_groups", a, 3.0, 13.2),
        _shared_row("cascade", a, 2.5, 11.0), _shared_row("prefix_blocks", a, None, None),  # skipped
        _shared_row("fused", b, 1.5, 4.0), _shared_row("cascade", b, 3.5, 9.3),
        _shared_row("cudnn_sdpa", b, 4.0, 10.6),  # not among the shared panel's implementations
        dict(_shared_row("fused", b, 0.7, 1.4), kv_dtype="fp8")]  # fp8: not in the bf16 panel
    figs = _capture(monkeypatch, e1_throughput)
    e1_throughput.draw(rows, res.manifest, tmp_path / "e1")
    (fig,) = figs
    shared = fig.get_axes()[-1]
    assert shared.get_yscale() == "log"
    floor = shared.get_ylim()[0]
    assert floor <= 0.7
    tops = sorted((round(p.get_x() + p.get_width() / 2, 3), round(p.get_y() + p.get_height(), 6))
                  for p in shared.patches)
    # left to right: shape b (fewer anchors): fused, cascade; shape a: fused, fused_groups, cascade
    assert [y for _, y in tops] == [1.5, 3.5, 1.0, 3.0, 2.5]
    assert all(p.get_y() == floor for p in shared.patches)
    ticks = sorted((x, y) for line in shared.get_lines() if line.get_marker() == "_"
                   for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True))
    assert [y for _, y in ticks] == [4.0, 9.3, 4.4, 13.2, 11.0]
    assert [round(x, 3) for x, _ in ticks] == [x for x, _ in tops]  # each tick sits on its bar
    assert [t.get_text() for t in shared.get_xticklabels()] == ["B=128, L=1K\nA=2K\n16 per prefix",
                                                               "B=32, L=2K\nA=8K\n32 per prefix"]
    labels = _legend_labels(fig)
    assert {style.implementation("fused_groups").label, "over logical bytes (bottom)"} <= labels
    _check_printed(fig, tmp_path / "e1.pdf", style.TEXT_WIDTH)


E0_ROWS = [{"form": f, "context": c, "intermediate_bytes": b, "ms": ms}
           for c, n in ((512, 589824), (4096, 4259840))
           for f, b, ms in (("naive", n, 17.0), ("two_softmax", n + 1024, 4.0),
                            ("sdpa_fused", 0 if c < 4096 else 67584, 1.0))]


def test_e0_zero_bytes_drawn_and_both_unfused_forms_visible(tmp_path, monkeypatch):
    figs = _capture(monkeypatch, e0_unfused)
    e0_unfused.draw(E0_ROWS, MANIFEST, tmp_path / "e0")
    (fig,) = figs
    ax_bytes = fig.get_axes()[0]
    lines = {line.get_color(): line for line in ax_bytes.get_lines()}
    single = lines[style.implementation("sdpa_fused").color]
    assert list(single.get_ydata()) == [0, 67584]
    assert ax_bytes.get_ylim()[0] < 0 < ax_bytes.get_ylim()[1]  # the zero point is inside the axes
    assert "0" in [t.get_text() for t in ax_bytes.get_yticklabels()]
    naive, two = lines[style.implementation("naive").color], lines[style.implementation("two_softmax").color]
    assert naive.get_markerfacecolor() == "none" and naive.get_markersize() > two.get_markersize()
    assert naive.get_zorder() < two.get_zorder()
    assert _legend_labels(fig) == {style.implementation(f).label for f in ("naive", "two_softmax", "sdpa_fused")}
    _check_printed(fig, tmp_path / "e0.pdf", style.COLUMN_WIDTH)
    with pytest.raises(ValueError, match="every intermediate_bytes is 0"):
        e0_unfused.draw([dict(r, intermediate_bytes=0) for r in E0_ROWS], MANIFEST, tmp_path / "zero")


def _e2_rows():
    cfg = e2_experiment.E2Config(hbm_contexts=[1024, 32768, 1048576])
    base = {"kind": "variant", "kernel": "attention", "mode": "decode", "head_dim": 128, "kv_dtype": "bf16",
            "varied": None, "block_size": 16, "group": 4, "block_m": 16, "tile_n": 64,
            "shared_bytes": 39936, "model_bytes": 36864, "model_ratio": 1.0833, "registers": 122, "num_warps": 4,
            "spill_stores": 0, "spill_loads": 0}
    sweeps = [dict(base, block_size=32), dict(base, block_size=64), dict(base, group=1),
              dict(base, group=8), dict(base, varied="tile_n=32", tile_n=32),
              dict(base, varied="anchor_groups=1", registers=233, shared_bytes=82944)]
    flat = [{"kind": "flat", "head_dim": 128, "anchors": a, "context": c, "hash": "h", "shared_bytes": 39936,
             "registers": 122, "grid": f"1x8x{c // 4096 + 1}"} for a, c in ((0, 1024), (64, 4096), (64, 1 << 20))]
    return [base, *sweeps, *flat, *e2_experiment._hbm_rows(cfg)]


def test_e2_forms_visible_categories_unjoined(tmp_path, monkeypatch):
    figs = _capture(monkeypatch, e2_sram)
    rows = _e2_rows()
    rows.insert(0, dict(rows[1], model_bytes=2 * 36864))  # a page-size sweep listed first
    e2_sram.draw(rows, dict(MANIFEST, config={"block_size": 16, "group": 4}), tmp_path / "e2")
    (fig,) = figs
    ax_flat, ax_hbm = fig.get_axes()
    model = [ln for ln in ax_flat.get_lines() if ln.get_label().startswith("model")]
    assert [ln.get_ydata()[0] for ln in model] == [36]  # KiB, the default variant's, not a sweep's
    assert all(line.get_linestyle() == "None" or len(set(line.get_xdata())) == 1 or len(set(line.get_ydata())) == 1
               for line in ax_flat.get_lines())
    naive = [ln for ln in ax_hbm.get_lines() if ln.get_color() == style.implementation("naive").color]
    two = [ln for ln in ax_hbm.get_lines() if ln.get_color() == style.implementation("two_softmax").color]
    assert len(naive) == len(two) == 2  # prefill and decode each
    assert all(n.get_markerfacecolor() == "none" and n.get_markersize() > t.get_markersize()
               for n, t in zip(naive, two, strict=True))
    assert {style.implementation("naive").label, style.implementation("two_softmax").label,
            "H200 HBM 141 GB", "shared memory (KiB)", "registers / thread"} <= _legend_labels(fig)
    _check_printed(fig, tmp_path / "e2.pdf", style.COLUMN_WIDTH)


def test_e5_reference_figure_at_print_size(tmp_path, monkeypatch):
    res = load_results("e5_accuracy", REFERENCE / "e5_accuracy.csv")
    figs = _capture(monkeypatch, e5_accuracy)
    e5_accuracy.draw(res.rows, res.manifest, tmp_path / "e5")
    _check_printed(figs[0], tmp_path / "e5.pdf", style.COLUMN_WIDTH)


def test_e2_table_labels_every_variant():
    rows = _e2_rows()
    manifest = {"config": {"block_size": 16, "group": 4}}
    table = e2_report.macros(rows, manifest)["e2.table"].splitlines()
    labels = [line.split(" & ")[3] for line in table]
    assert labels == ["default", "page 32", "page 64", "group 1", "group 8", "$T_N$ 32", "read-once groups"]
    with pytest.raises(ValueError, match="config.block_size and config.group"):
        e2_report.macros(rows, {})
    names = " ".join(c.evidence for c in e2_report.claims([dict(rows[1], spill_stores=8), *rows[2:]], manifest))
    assert "decode D128 bf16 block_size=32: 8 B" in names

