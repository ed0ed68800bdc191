"""E5: training and accuracy experiments (tiny shapes, CPU)."""

import math

import pytest
import torch

from fieldprint.experiments.common import compose
from fieldprint.experiments.e5_accuracy import (
    E5AccuracyConfig,
    attention_rows,
    kv_store,
    lm_windows,
    parse_format,
    round_trip,
    row_scale,
)
from fieldprint.experiments.e5_accuracy import run as run_accuracy
from fieldprint.experiments.e5_train import E5TrainConfig, save_checkpoint
from fieldprint.experiments.e5_train import run as run_train
from fieldprint.model import ModelConfig, Transformer, score_plain
from fieldprint.quant import dequantize, quantize

MODEL = dict(n_layer=2, d_model=32, n_head=4, n_kv_head=2, context=64)


def write_text(path, n: int, seed: int) -> str:
    """Printable pseudo-text with some structure (words, lines)."""
    g = torch.Generator().manual_seed(seed)
    words = ["the", "king", "queen", "lord", "my", "and", "of", "thee", "Enter", "Exit."]
    idx = torch.randint(0, len(words), (n,), generator=g).tolist()
    text = " ".join(words[i] for i in idx).replace("Exit. ", "Exit.\n")
    path.write_text(text)
    return str(path)


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**MODEL))
    save_checkpoint(tmp_path / "model.pt", model, E5TrainConfig(**MODEL, save_dtype="fp32"), {})
    return str(tmp_path / "model.pt"), model.eval()


def accuracy_config(tmp_path, ckpt: str, **kw) -> E5AccuracyConfig:
    base = dict(checkpoint=ckpt, valid_path=write_text(tmp_path / "valid.txt", 400, 1),
                out_dir=str(tmp_path / "out"), anchor_bytes=16, window=32, eval_windows=5,
                batch=2, chunk=16, block_size=16, formats=["e4m3:rne", "e4m3:stochastic"],
                anchors_quantized=[True, False], seeds=[0, 1], attn_batch=2, attn_context=40,
                attn_anchors=17, attn_queries=3, heads_q=4, heads_kv=2, head_dim=16)
    return E5AccuracyConfig(**{**base, **kw})


def test_reference_format_reproduces_plain_loss(tmp_path, checkpoint):
    path, model = checkpoint
    cfg = accuracy_config(tmp_path, path, formats=["e4m3:stochastic"],
                          anchors_quantized=[True, False], seeds=[0, 1], eval_windows=3)
    rows = run_accuracy(cfg)
    anchor, windows = lm_windows(cfg, model.cfg.context)
    assert anchor.numel() == 16 and windows.shape == (3, 33)
    plain = float(score_plain(model, anchor, windows).sum()) / windows[:, 1:].numel() / math.log(2)
    lm = [r for r in rows if r["kind"] == "lm"]
    ref = [r for r in lm if r["fmt"] == "reference"]
    assert len(ref) == 1 and ref[0]["n_bytes"] == 96
    assert ref[0]["bpb"] == pytest.approx(plain, rel=1e-5)
    # 1 reference + stochastic x 2 anchor settings x 2 seeds
    assert len(lm) == 5
    others = [r["bpb"] for r in lm if r["fmt"] != "reference"]
    assert all(b != ref[0]["bpb"] and abs(b - ref[0]["bpb"]) < 0.05 for b in others)
    sto = {(r["anchors_quantized"], r["seed"]): r["bpb"] for r in lm if r["rounding"] == "stochastic"}
    assert sto[(True, 0)] != sto[(True, 1)]  # seeds matter
    for r in rows:
        assert {"kind", "fmt", "rounding", "anchors_quantized", "seed", "bpb", "bits",
                "rel_err"} <= set(r)


def test_round_trip_is_quantize_dequantize_with_row_scales():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, 16, generator=g) * torch.tensor([1e-3, 10.0])[None, :, None]
    for fmt, rounding in (("e4m3", "rne"), ("int8", "two_grid"), ("e5m2", "trunc"), ("bf16", "rne")):
        scale = row_scale(x, fmt)
        qt = quantize(x, fmt, rounding, scale=scale)
        torch.testing.assert_close(round_trip(x, fmt, rounding, 0), dequantize(qt), rtol=0, atol=0)
        # a row is stored the same whatever else was written with it (batch invariance)
        torch.testing.assert_close(round_trip(x[2:3], fmt, rounding, 0), round_trip(x, fmt, rounding, 0)[2:3],
                                   rtol=0, atol=0)
    s = row_scale(x, "e4m3")
    assert s.shape == (6, 2, 1)
    assert bool((x.abs().amax(-1, keepdim=True) <= 448 * s).all())
    assert bool((x.abs().amax(-1, keepdim=True) > 224 * s).all())  # the smallest such power of two
    assert row_scale(torch.zeros(2, 1, 4), "int8").eq(1).all()


def test_page_scale_is_one_scale_per_page():
    """Page mode: one power-of-two scale per block_size tokens x heads x dim, as the commit
    layer stores pages; a page with a huge value coarsens only its own page."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(8, 2, 16, generator=g)
    x[5, 1, 3] = 300.0  # in page 1 (tokens 4..7)
    y = round_trip(x, "int8", "rne", 0, page_tokens=4)
    torch.testing.assert_close(y[:4], round_trip(x[:4], "int8", "rne", 0, page_tokens=4), rtol=0, atol=0)
    step0 = 2.0 ** -7 * 4  # page 0: amax ~3-4 -> scale 2**-5
    assert (y[:4] - x[:4]).abs().max() <= step0 / 2
    assert (y[4:] - x[4:]).abs().max() > step0  # page 1's scale is 4 (300 <= 127 * 4)
    assert y[5, 1, 3] == 300.0
    with pytest.raises(ValueError, match="whole pages"):
        round_trip(x[:6], "int8", "rne", 0, page_tokens=4)


def test_stochastic_store_reseeds_each_write():
    x = torch.randn(4, 2, 16, generator=torch.Generator().manual_seed(3))
    store = kv_store("e4m3", "stochastic", seed=5)
    first, second = store(x, 0, "k"), store(x, 0, "k")
    assert not torch.equal(first, second)
    again = kv_store("e4m3", "stochastic", seed=5)
    assert torch.equal(again(x, 0, "k"), first)  # reproducible from the seed


def test_attention_error_orders_formats(tmp_path, checkpoint):
    cfg = accuracy_config(tmp_path, checkpoint[0], seeds=[0],
                          formats=["fp16:rne", "bf16:rne", "e4m3:rne", "e4m3:two_grid", "e5m2:rne"],
                          anchors_quantized=[True])
    err = {(r["fmt"], r["rounding"]): r["rel_err"] for r in attention_rows(cfg, "cpu")}
    assert 0 < err[("fp16", "rne")] < err[("bf16", "rne")] < err[("e4m3", "rne")] < err[("e5m2", "rne")]
    # two-grid decodes within a quarter spacing, RNE within a half
    assert err[("e4m3", "two_grid")] < err[("e4m3", "rne")]
    assert err[("e4m3", "rne")] < 0.1


def test_train_runs_and_stops_on_time(tmp_path):
    train = write_text(tmp_path / "train.txt", 2000, 4)
    valid = write_text(tmp_path / "valid.txt", 400, 5)
    cfg = E5TrainConfig(**MODEL, train_path=train, valid_path=valid, out_dir=str(tmp_path / "t"),
                        batch_size=4, lr=3e-3, warmup_steps=2, max_steps=6, eval_every=3,
                        val_windows=4, save_dtype="fp32")
    rows = run_train(cfg)
    assert [r["step"] for r in rows] == [3, 6] and rows[-1]["final"] is True
    assert rows[-1]["val_bpb"] == pytest.approx(rows[-1]["val_loss"] / math.log(2))
    assert rows[-1]["val_loss"] < rows[0]["val_loss"] < math.log(256)
    ckpt = torch.load(tmp_path / "t" / "model.pt", weights_only=True)
    assert ckpt["model_config"]["d_model"] == 32
    # the clock: a budget of ~6 ms stops the loop early, with a final row all the same
    quick = run_train(E5TrainConfig(**{**cfg.__dict__, "max_steps": 10_000, "max_minutes": 1e-4}))
    assert quick[-1]["final"] is True and quick[-1]["step"] < 10_000


@pytest.mark.parametrize("kwargs, match", [
    (dict(formats=["e4m3"]), "fmt:rounding"),
    (dict(formats=["e4m3:nearest"]), "fmt:rounding"),
    (dict(formats=["fp4:rne"]), "fmt:rounding"),
    (dict(formats=[]), "formats"),
    (dict(formats=["bf16:rne", "bf16:rne"]), "duplicates"),
    (dict(kernel_formats=["fp16:rne"]), "kernel_formats"),
    (dict(attention="kernel"), "kernel_formats"),
    (dict(attention="flash"), "attention"),
    (dict(seeds=[]), "seeds"),
    (dict(anchors_quantized=[1]), "booleans"),
    (dict(heads_q=6, heads_kv=4), "multiple"),
    (dict(window=0), "window"),
    (dict(attn_queries=50, attn_context=40), "attn_queries"),
    (dict(kv_scale="tensor"), "kv_scale"),
    (dict(kv_scale="page", anchor_bytes=20), "anchor_bytes"),
    (dict(kv_scale="page", chunk=24), "chunk"),
])
def test_bad_accuracy_config(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        E5AccuracyConfig(**kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(autocast="fp16"), "autocast"),
    (dict(save_dtype="fp8"), "save_dtype"),
    (dict(max_minutes=0), "max_minutes"),
    (dict(d_model=100, n_head=3), "multiple"),
    (dict(batch_size=0), "batch_size"),
])
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        E5TrainConfig(**kwargs)


def test_runtime_errors_name_the_problem(tmp_path, checkpoint):
    with pytest.raises(ValueError, match="checkpoint"):
        run_accuracy(accuracy_config(tmp_path, str(tmp_path / "nope.pt")))
    with pytest.raises(ValueError, match="exceed the model context"):
        lm_windows(accuracy_config(tmp_path, checkpoint[0], anchor_bytes=48, window=32), 64)
    with pytest.raises(ValueError, match="train_path"):
        run_train(E5TrainConfig(**MODEL, train_path=str(tmp_path / "none.txt")))
    assert parse_format("int8:two_grid") == ("int8", "two_grid")


@pytest.mark.parametrize("scale", ["smoke", "paper"])
def test_configs_compose(scale):
    train = compose("e5_train", E5TrainConfig, [f"scale={scale}"])
    acc = compose("e5_accuracy", E5AccuracyConfig, [f"scale={scale}"])
    assert acc.checkpoint == f"{train.out_dir}/model.pt"
    assert acc.anchor_bytes + acc.window <= train.context
    with pytest.raises(Exception, match="no_such_key"):
        compose("e5_accuracy", E5AccuracyConfig, [f"scale={scale}", "+no_such_key=1"])


def _fake_rows() -> list[dict]:
    """Typed rows (as fieldprint.results reads them) of a complete grid, with costs that grow
    with the error."""
    rows = [{"kind": "lm", "fmt": "reference", "rounding": "none", "anchors_quantized": False,
             "seed": 0, "attention": "naive", "bpb": 2.0, "n_bytes": 1000, "rel_err": None,
             "params": 9540480, "train_steps": 6000, "train_val_bpb": 1.95}]
    err = {"bf16:rne": 0.003, "fp16:rne": 0.0004, "e4m3:rne": 0.04, "e4m3:trunc": 0.1,
           "e4m3:stochastic": 0.06, "e4m3:two_grid": 0.02, "e5m2:rne": 0.09, "e5m2:trunc": 0.2,
           "e5m2:stochastic": 0.13, "int8:rne": 0.02, "int8:two_grid": 0.01}
    for item, e in err.items():
        fmt, rounding = item.split(":")
        for aq in (True, False):
            for seed in (0, 1) if rounding == "stochastic" else (0,):
                common = {"fmt": fmt, "rounding": rounding, "anchors_quantized": aq, "seed": seed}
                bpb = 2.0 * (1 + e / 10 + 0.001 * seed)
                rows.append({"kind": "lm", **common, "attention": "naive", "bpb": bpb,
                             "n_bytes": 1000, "rel_err": None})
                rows.append({"kind": "attention", **common, "attention": "reference", "bpb": None,
                             "n_bytes": None, "rel_err": e})
    rows.append({**rows[5], "attention": "kernel", "bpb": rows[5]["bpb"] + 0.002})
    return rows


def test_report_and_figure(tmp_path):
    from fieldprint.plots.e5_accuracy import draw
    from fieldprint.report import render_macros
    from fieldprint.report.e5_accuracy import claims, macros

    rows = _fake_rows()
    manifest = {"config": {"anchor_bytes": 128, "window": 384, "eval_windows": 512, "seeds": [0, 1]},
                "gpu": "NVIDIA H200", "date": "2026-11-29T00:00:00"}
    m = macros(rows, manifest)
    render_macros(m)  # keys are valid
    assert m["e5.ref_bpb"] == "2.000" and m["e5.params_m"] == "9.5"
    assert m["e5.pct.e4m3.rne"] == "+0.40" and m["e5.pct.e4m3.twogrid"] == "+0.20"
    assert m["e5.attn.e4m3.twogrid"] == "2" and m["e5.kernel_gap"] == "at most 0.10\\%"
    verdicts = {c.id: c.supported for c in claims(rows, manifest)}
    assert verdicts["e5.model_real"] and verdicts["e5.e4m3_rne_lt1pct"] and verdicts["e5.e4m3_two_grid_lt1pct"]
    assert verdicts["e5.two_grid_attn.e4m3"] and verdicts["e5.trunc_worst_attn"]
    assert verdicts["e5.half_free"]
    assert verdicts["e5.kernel_matches"]
    bad = [dict(r, bpb=2.5) if r["fmt"] == "reference" else r for r in rows]
    assert not {c.id: c.supported for c in claims(bad, manifest)}["e5.model_real"]
    costly = [dict(r, bpb=r["bpb"] * 1.02) if (r["fmt"], r["rounding"]) == ("e4m3", "two_grid") and r["bpb"] else r
              for r in rows]  # two-grid 2% over the reference
    assert not {c.id: c.supported for c in claims(costly, manifest)}["e5.e4m3_two_grid_lt1pct"]
    draw(rows, manifest, tmp_path / "fig")
    assert (tmp_path / "fig.pdf").stat().st_size > 1000 and (tmp_path / "fig.png").exists()
