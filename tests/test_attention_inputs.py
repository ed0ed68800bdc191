"""Every bad input to the attention entry points is a clear ValueError / TypeError naming the
argument, raised before any kernel runs (docs/DESIGN.md). The fused kernel and the reference share
the checks of fieldprint.attention.inputs; the kernel adds its own (device, q/KV dtype pairing,
strides, head dim, page size, split length, config)."""

from __future__ import annotations

import pytest
import torch

from fieldprint.attention import paged_anchor_attention, reference_attention

BOTH = [paged_anchor_attention, reference_attention]


def good(dtype=torch.bfloat16):
    """Two sequences (decode + 3-token prefill), pool of 6 blocks of 16, anchors of 5 and 0."""
    g = torch.Generator().manual_seed(0)
    return dict(
        q=torch.randn(4, 4, 64, generator=g).to(dtype),
        k_cache=torch.randn(6, 16, 2, 64, generator=g).to(dtype),
        v_cache=torch.randn(6, 16, 2, 64, generator=g).to(dtype),
        block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
        seq_lens=torch.tensor([20, 9], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1, 4], dtype=torch.int32),
        anchor_block_table=torch.tensor([[4], [4]], dtype=torch.int32),
        anchor_lens=torch.tensor([5, 0], dtype=torch.int32),
    )


def i32(*rows):
    return torch.tensor(rows, dtype=torch.int32)


# (name, changes to the good arguments, exception, text the message must contain)
SHARED = [
    ("q not a tensor", {"q": [[1.0]]}, TypeError, "q must be a torch.Tensor"),
    ("q 2-D", {"q": torch.zeros(4, 64, dtype=torch.bfloat16)}, ValueError, "q must have 3 dimensions"),
    ("q int", {"q": torch.zeros(4, 4, 64, dtype=torch.int32)}, TypeError, "q must have dtype"),
    ("k int", {"k_cache": torch.zeros(6, 16, 2, 64, dtype=torch.int8)}, TypeError, "k_cache must have dtype"),
    ("v shape", {"v_cache": torch.zeros(6, 16, 1, 64, dtype=torch.bfloat16)}, ValueError, "v_cache shape"),
    ("v dtype", {"v_cache": torch.zeros(6, 16, 2, 64, dtype=torch.float16)}, TypeError, "v_cache dtype"),
    ("head dim", {"k_cache": torch.zeros(6, 16, 2, 32, dtype=torch.bfloat16),
                  "v_cache": torch.zeros(6, 16, 2, 32, dtype=torch.bfloat16)}, ValueError, "head dim"),
    ("Hq % Hkv", {"k_cache": torch.zeros(6, 16, 3, 64, dtype=torch.bfloat16),
                  "v_cache": torch.zeros(6, 16, 3, 64, dtype=torch.bfloat16)}, ValueError, "multiple of"),
    ("empty pool", {"k_cache": torch.zeros(0, 16, 2, 64, dtype=torch.bfloat16),
                    "v_cache": torch.zeros(0, 16, 2, 64, dtype=torch.bfloat16)}, ValueError, "at least one block"),
    ("table int64", {"block_table": torch.zeros(2, 2, dtype=torch.int64)}, TypeError, "block_table must be int32"),
    ("table 1-D", {"block_table": i32(0, 1)}, ValueError, "block_table must have 2 dimensions"),
    ("seq_lens rows", {"seq_lens": i32(20, 9, 3)}, ValueError, "seq_lens must have 2 rows"),
    ("qsl rows", {"query_start_loc": i32(0, 4)}, ValueError, "query_start_loc must have 3 rows"),
    ("anchors half", {"anchor_lens": None}, ValueError, "given together"),
    ("anchor rows", {"anchor_block_table": i32([4])}, ValueError, "anchor_block_table must have 2 rows"),
    ("device", {"seq_lens": torch.zeros(2, dtype=torch.int32, device="meta")}, ValueError, "seq_lens is on meta"),
    ("k_scale sign", {"k_scale": -1.0}, ValueError, "k_scale must be a finite positive number"),
    ("k_scale zero", {"k_scale": 0.0}, ValueError, "k_scale must be a finite positive number"),
    ("k_scale nan", {"k_scale": float("nan")}, ValueError, "k_scale must be a finite positive number"),
    ("v_scale inf", {"v_scale": float("inf")}, ValueError, "v_scale must be a finite positive number"),
    ("k_scale bool", {"k_scale": True}, TypeError, "k_scale must be a finite positive number"),
    ("k_scale shape", {"k_scale": torch.ones(3)}, ValueError, "k_scale must be per-tensor"),
    ("v_scale type", {"v_scale": "1"}, TypeError, "v_scale must be a finite positive number, a 0-d tensor"),
    ("v_scale int tensor", {"v_scale": torch.ones(2, dtype=torch.int32)}, TypeError, "v_scale must be a floating"),
    ("softmax_scale", {"softmax_scale": 0.0}, ValueError, "softmax_scale must be a finite positive"),
    ("softmax_scale inf", {"softmax_scale": float("inf")}, ValueError, "softmax_scale must be a finite positive"),
    ("window", {"sliding_window": 0}, ValueError, "sliding_window must be a positive int"),
    ("window bool", {"sliding_window": True}, TypeError, "sliding_window must be a positive int (tokens) or None, "
                                                         "got bool True"),
    ("window float", {"sliding_window": 8.0}, TypeError, "sliding_window must be a positive int"),
    ("softcap", {"logit_softcap": -1.0}, ValueError, "logit_softcap must be a finite positive"),
    ("softcap bool", {"logit_softcap": True}, TypeError, "logit_softcap must be a finite positive"),
    # checks that read the index tensors
    ("qsl start", {"query_start_loc": i32(1, 2, 4)}, ValueError, "query_start_loc must start at 0"),
    ("qsl end", {"query_start_loc": i32(0, 1, 3)}, ValueError, "end at T=4"),
    ("qsl order", {"query_start_loc": i32(0, 5, 4)}, ValueError, "non-decreasing"),
    ("seq < q_len", {"seq_lens": i32(20, 2)}, ValueError, "seq_lens[1] = 2 is smaller than its query count 3"),
    ("seq > table", {"seq_lens": i32(33, 9)}, ValueError, "exceeds block_table capacity 32"),
    ("block id high", {"block_table": i32([0, 6], [2, 3])}, ValueError, "block_table[0, 1] = 6 is outside"),
    ("block id negative", {"block_table": i32([0, 1], [-1, 3])}, ValueError, "block_table[1, 0] = -1"),
    ("anchor len", {"anchor_lens": i32(17, 0)}, ValueError, "anchor_lens must lie in [0, 16]"),
    ("anchor negative", {"anchor_lens": i32(-1, 0)}, ValueError, "anchor_lens must lie"),
    ("anchor id", {"anchor_block_table": i32([9], [4])}, ValueError, "anchor_block_table[0, 0] = 9"),
    # tensor scales: their values are read with the index tensors
    ("k_scale tensor nan", {"k_scale": torch.tensor([1.0, float("nan")])}, ValueError,
     "k_scale must be finite and positive, got k_scale[1] = nan"),
    ("k_scale tensor inf", {"k_scale": torch.tensor([float("inf"), 1.0])}, ValueError, "got k_scale[0] = inf"),
    ("v_scale tensor zero", {"v_scale": torch.tensor([0.5, 0.0])}, ValueError,
     "v_scale must be finite and positive, got v_scale[1] = 0.0"),
    ("v_scale 0-d negative", {"v_scale": torch.tensor(-0.5)}, ValueError,
     "v_scale must be finite and positive, got v_scale = -0.5"),
]


@pytest.mark.parametrize("fn", BOTH, ids=["kernel", "reference"])
@pytest.mark.parametrize("name,change,exc,text", SHARED, ids=[c[0] for c in SHARED])
def test_bad_input(fn, name, change, exc, text):
    args = good()
    args.update(change)
    with pytest.raises(exc) as err:
        fn(**args)
    assert text in str(err.value)


@pytest.mark.interpreted
def test_unused_table_entries_are_not_checked():
    """Entries past a sequence's blocks may hold anything (they are never read)."""
    args = good()
    args["block_table"] = i32([0, 1, 99], [2, -5, 77])
    for fn in BOTH:
        fn(**args)


def _non_contiguous_last(x):
    return torch.stack([x, x], -1)[..., 0]


KERNEL_ONLY = [
    ("q float32", {"q": torch.zeros(4, 4, 64)}, {}, TypeError, "q must have dtype"),
    ("kv float32", {"k_cache": torch.zeros(6, 16, 2, 64), "v_cache": torch.zeros(6, 16, 2, 64)}, {},
     TypeError, "k_cache must have dtype"),
    ("q/kv dtype", {"q": torch.zeros(4, 4, 64, dtype=torch.float16)}, {}, TypeError, "must equal q dtype"),
    ("q stride", {"q": _non_contiguous_last(torch.zeros(4, 4, 64, dtype=torch.bfloat16))}, {},
     ValueError, "q must be contiguous in its last dimension"),
    ("table stride", {"block_table": _non_contiguous_last(i32([0, 1], [2, 3]))}, {},
     ValueError, "block_table must be contiguous"),
    ("head dim 96", {"q": torch.zeros(4, 4, 96, dtype=torch.bfloat16),
                     "k_cache": torch.zeros(6, 16, 2, 96, dtype=torch.bfloat16),
                     "v_cache": torch.zeros(6, 16, 2, 96, dtype=torch.bfloat16)}, {}, ValueError, "head dim must be"),
    ("block size 8", {"k_cache": torch.zeros(12, 8, 2, 64, dtype=torch.bfloat16),
                      "v_cache": torch.zeros(12, 8, 2, 64, dtype=torch.bfloat16)}, {}, ValueError, "block size"),
    ("split length", {}, {"kv_split_tokens": 100}, ValueError, "kv_split_tokens must be a positive power"),
    ("split vs tile", {}, {"kv_split_tokens": 16, "config": {"tile_n": 32}}, ValueError,
     "multiple of the KV tile"),
    ("config key", {}, {"config": {"tiles": 16}}, ValueError, "unknown kernel config"),
    ("config tile", {}, {"config": {"tile_n": 24}}, ValueError, "tile_n must be a power of two"),
]


@pytest.mark.parametrize("name,change,kw,exc,text", KERNEL_ONLY, ids=[c[0] for c in KERNEL_ONLY])
def test_bad_kernel_input(name, change, kw, exc, text):
    args = good()
    args.update(change)
    with pytest.raises(exc) as err:
        paged_anchor_attention(**args, **kw)
    assert text in str(err.value)


def test_cpu_without_interpreter_points_at_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="reference_attention"):
        paged_anchor_attention(**good())


@pytest.mark.interpreted
def test_fp8_kv_takes_16_bit_queries():
    for q_dtype in (torch.float16, torch.bfloat16):
        args = good(q_dtype)
        args["k_cache"] = args["k_cache"].to(torch.float8_e4m3fn)
        args["v_cache"] = args["v_cache"].to(torch.float8_e4m3fn)
        out = paged_anchor_attention(**args, k_scale=torch.tensor([1.0, 2.0]), v_scale=0.5)
        assert out.dtype == q_dtype and out.isfinite().all()


def test_fp8_kv_rejects_queries_beyond_fp16_range():
    args = good(torch.bfloat16)
    args["k_cache"] = args["k_cache"].to(torch.float8_e4m3fn)
    args["v_cache"] = args["v_cache"].to(torch.float8_e4m3fn)
    args["q"] = args["q"].clone()
    args["q"][0, 0, 0] = 70000.0
    with pytest.raises(ValueError, match=r"q: .*65504"):
        paged_anchor_attention(**args)


def test_validate_false_still_checks_shapes():
    args = good()
    args["block_table"] = torch.zeros(2, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="block_table must be int32"):
        paged_anchor_attention(**args, validate=False)
