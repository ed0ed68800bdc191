"""SASS counts of the BLAKE3 chunk kernel and the integer-issue ceiling (fieldprint.sass, E3's SASS
step, the ceiling macros of report/e3_hash.py).

The compile runs once per session in a fresh process without TRITON_INTERPRET (the interpreter
replaces @triton.jit functions, and once interpreted kernels have run, Triton's code generation
fails in that process), through the same command the workflow's ``sass_counts`` rule runs."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from fieldprint import hashing, sass
from fieldprint.experiments.common import compose
from fieldprint.experiments.e3_sass import E3SassConfig, launches
from fieldprint.report import e3_hash as rep
from fieldprint.results import SCHEMAS, load_results

ROOT = Path(__file__).resolve().parents[1]
G_PER_COMPRESSION = sass.ROUNDS * sass.G_PER_ROUND  # 56


@pytest.fixture(scope="module")
def sass_results(tmp_path_factory):
    """The e3_sass results the rule would write (paper config: 4 GiB, 32 KiB pages), checked."""
    out = tmp_path_factory.mktemp("e3_sass")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    subprocess.run([sys.executable, "-m", "fieldprint.experiments.e3_sass", f"out_dir={out}"], env=env,
                   cwd=ROOT, check=True, capture_output=True, text=True)
    return load_results("e3_sass", out / "e3_sass.csv")  # schema, expected launches, manifest


def _counts(res, impl):
    return {r["mnemonic"]: r["count"] for r in res.rows if r["impl"] == impl}


# ---------------------------------------------------------------- the compiled loop


def test_rule_output_validates_and_names_both_launches(sass_results):
    cfg = sass_results.manifest["config"]
    assert (cfg["total_bytes"], cfg["page_bytes"]) == (4 * 2**30, 32768)
    assert {(r["impl"], r["n_rows"], r["row_bytes"]) for r in sass_results.rows} == {
        ("blake3_gpu", 1, 4 * 2**30), ("blake3_many_gpu", 2**17, 32768)}


def test_loop_is_one_compression(sass_results):
    """One iteration = 7 rounds x 8 G: one funnel shift per rotation (4 per G), at least the
    4 XORs per G and 8 for the output (LOP3), at least one add instruction per addition (4 per G;
    ptxas splits them between IADD3 and IMAD.IADD, and an add of a constant may become VIADD)."""
    for impl in ("blake3_gpu", "blake3_many_gpu"):
        c = _counts(sass_results, impl)
        assert all(n > 0 for n in c.values())
        assert c["SHF.L.W.U32.HI"] == G_PER_COMPRESSION * sass.ROTATIONS_PER_G
        assert c["LOP3.LUT"] >= G_PER_COMPRESSION * 4 + 8
        assert c.get("IADD3", 0) + c.get("IMAD.IADD", 0) + c.get("VIADD", 0) >= G_PER_COMPRESSION * 4
        # one block per lane per iteration: the 64 bytes arrive as 4 x 16-byte loads (ALIGNED)
        assert c["LDG.E.128"] == 4 and c["BRA"] == 1
        # the loop only: the kernel's set-up and chaining-value stores are outside it
        assert not any(m.startswith(("STG", "EXIT", "S2R")) for m in c)


def test_counts_are_stable_across_launches(sass_results):
    """The single 4 GiB message (64-bit length) and the pages (32-bit) are different binaries
    with the same loop."""
    one, many = (_counts(sass_results, i) for i in ("blake3_gpu", "blake3_many_gpu"))
    assert one == many
    hashes = {r["impl"]: r["cubin_sha256"] for r in sass_results.rows}
    assert hashes["blake3_gpu"] != hashes["blake3_many_gpu"]


def test_ceiling_holds_against_the_h200_reference(sass_results):
    """The committed H200 measurement of the same launches stays below the ceiling, and above
    the bound that puts every integer instruction on one pipe (what tells the models apart)."""
    measured = load_results("e3_hash", ROOT / "data/reference/h200/e3_hash.csv")
    m = rep.ceiling_macros(sass_results.rows, measured.rows)
    assert m["e3.ceiling.verdict"] == "holds"
    assert m["e3.ceiling.one_pipe_vs_measured"] == "exceeds"
    assert m["e3.ceiling.bound"] == "integer issue"
    for impl in ("blake3_gpu", "blake3_many_gpu"):
        assert float(m[f"e3.ceiling.{impl}.measured_tbps"]) <= float(m[f"e3.ceiling.{impl}.tbps"])
        assert m[f"e3.ceiling.{impl}.binding"] == "ALU"
        assert m[f"e3.ceiling.{impl}.binding_count"] == m[f"e3.sass.{impl}.alu"]


# ---------------------------------------------------------------- the launch compiled


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


@pytest.mark.parametrize("n_rows,row_bytes", [(3, 2112), (2, 100), (2, 101), (1, 64), (5, 4096)])
def test_chunk_launch_is_the_launch_blake3_many_makes(monkeypatch, n_rows, row_bytes):
    chunk, parent = _Recorder(), _Recorder()
    monkeypatch.setattr(hashing.K, "chunk_kernel", chunk)
    monkeypatch.setattr(hashing.K, "parent_kernel", parent)
    hashing.blake3_many(torch.zeros((n_rows, row_bytes), dtype=torch.uint8), backend="triton")
    (real_args, real_kwargs), = chunk.calls
    args, kwargs = sass.chunk_launch(n_rows, row_bytes)
    assert kwargs == real_kwargs
    assert len(args) == len(real_args)
    for ours, theirs in zip(args, real_args, strict=True):
        if isinstance(theirs, torch.Tensor):
            assert (ours.shape, ours.dtype) == (theirs.shape, theirs.dtype)
        else:
            assert type(ours) is type(theirs) and ours == theirs


def test_chunk_launch_rejects_bad_sizes():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="row_bytes"):
            sass.chunk_launch(1, bad)
    with pytest.raises(ValueError, match="n_rows"):
        sass.chunk_launch(0, 64)


def test_compile_launch_refuses_the_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs the interpreter's stand-in for @triton.jit")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        sass.compile_launch(hashing.K.chunk_kernel, *sass.chunk_launch(1, 64))


# ---------------------------------------------------------------- SASS parsing


SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
        /*0010*/                   S2R R0, SR_CTAID.X ;                   /* 0x0000000000007919 */
        /*0020*/              @!P0 BRA 0x60 ;                             /* 0x000000000000094d */
        /*0030*/                   LOP3.LUT R2, R3, R4, R5, 0x96, !PT ;   /* 0x0000000000000000 */
        /*0040*/                   SHF.L.W.U32.HI R2, R2, 0x10, R2 ;      /* 0x0000000000000000 */
        /*0050*/                   IMAD.IADD R2, R2, 0x1, R3 ;            /* 0x0000000000000000 */
        /*0060*/                   LOP3.LUT R2, R3, R4, R5, 0x96, !PT ;   /* 0x0000000000000000 */
        /*0070*/               @P5 BRA 0x30 ;                             /* 0x0000000000000000 */
        /*0080*/                   EXIT ;                                 /* 0x000000000000794d */
        /*0090*/                   BRA 0x90;                              /* 0xfffffffc00fc7947 */
"""


def test_loop_body_between_the_backward_branch_and_its_target():
    body = sass.loop_body(sass.parse_sass(SASS))
    assert [i.address for i in body] == [0x30, 0x40, 0x50, 0x60, 0x70]
    assert sass.count_mnemonics(body) == {"BRA": 1, "IMAD.IADD": 1, "LOP3.LUT": 2, "SHF.L.W.U32.HI": 1}


def test_loop_body_refuses_no_loop_or_two():
    no_loop = SASS.replace("@P5 BRA 0x30", "@P5 BRA 0x80")
    with pytest.raises(ValueError, match="found 0"):
        sass.loop_body(sass.parse_sass(no_loop))
    two = SASS.replace("/*0060*/                   LOP3.LUT R2, R3, R4, R5, 0x96, !PT ;",
                       "/*0060*/                   BRA 0x40 ;")
    with pytest.raises(ValueError, match="found 2"):
        sass.loop_body(sass.parse_sass(two))
    with pytest.raises(ValueError, match="no SASS"):
        sass.parse_sass("Fatbin elf code:\n")


# ---------------------------------------------------------------- the model on hand-made counts


def test_pipes_of_mnemonics():
    assert [sass.pipe_of(m) for m in ("LOP3.LUT", "SHF.L.W.U32.HI", "IADD3.X", "ISETP.LT.AND", "VIADD")] \
        == ["alu"] * 5
    assert [sass.pipe_of(m) for m in ("IMAD.IADD", "IMAD.MOV.U32", "IMUL.WIDE")] == ["fma"] * 3
    assert [sass.pipe_of(m) for m in ("LDG.E.128", "UIADD3", "USEL", "BRA", "BAR.SYNC")] == ["issue"] * 5
    with pytest.raises(ValueError, match="mnemonic"):
        sass.pipe_of("lop3")


def test_ceiling_on_hand_made_counts():
    # ALU-bound: 200 ALU instructions at 64 lanes per clock per SM, 64 bytes per lane-iteration
    counts = {"LOP3.LUT": 100, "SHF.L.W.U32.HI": 90, "ISETP.NE.AND": 10, "IMAD.IADD": 50,
              "LDG.E.128": 4, "UIADD3": 2, "BRA": 1}
    pipes = sass.pipe_counts(counts)
    assert pipes == {"alu": 200, "fma": 50, "issue": 257}
    c = sass.ceiling(pipes)
    assert c.binding == "alu"
    assert c.bytes_per_s == pytest.approx(132 * 1.98e9 * 64 * 64 / 200, rel=1e-12)
    # FMA-bound, then issue-bound (a long tail of uniform instructions takes issue slots)
    assert sass.ceiling({"alu": 10, "fma": 300, "issue": 310}).binding == "fma"
    issue = sass.ceiling({"alu": 100, "fma": 100, "issue": 500})
    assert issue.binding == "issue"
    assert issue.bytes_per_s == pytest.approx(132 * 1.98e9 * 128 * 64 / 500, rel=1e-12)
    # moving adds from the ALU to the FMA pipe raises an ALU-bound ceiling
    assert sass.ceiling({"alu": 150, "fma": 100, "issue": 257}).bytes_per_s > c.bytes_per_s


def test_ceiling_refuses_bad_counts():
    with pytest.raises(ValueError, match="missing"):
        sass.ceiling({"alu": 1, "issue": 1})
    with pytest.raises(ValueError, match="at least"):
        sass.ceiling({"alu": 5, "fma": 5, "issue": 9})
    with pytest.raises(ValueError, match="non-negative"):
        sass.pipe_counts({"LOP3.LUT": -1})
    with pytest.raises(ValueError, match="at least one"):
        sass.pipe_counts({})


# ---------------------------------------------------------------- report macros on hand-made rows


def _sass_rows(impl, counts):
    return [{"impl": impl, "n_rows": 1, "row_bytes": 64, "mnemonic": m, "count": n, "cubin_sha256": "x"}
            for m, n in counts.items()]


def _measured(impl, gbps, nbytes=4 * 2**30):
    return {"impl": impl, "fmt": None, "rounding": None, "bytes": nbytes, "ms": 1.0, "gbps": gbps,
            "threads": None, "device": "cuda", "backend": "triton", "counted": "input",
            "page_elems": 16384, "peak_gpu_gib": 4.0, "status": "ok"}


LOOP = {"LOP3.LUT": 236, "SHF.L.W.U32.HI": 224, "IADD3": 115, "IMAD.IADD": 108, "LDG.E.128": 4,
        "ISETP.LT.AND": 40, "BRA": 1}
SASS_ROWS = _sass_rows("blake3_gpu", LOOP) + _sass_rows("blake3_many_gpu", LOOP)


def test_ceiling_macros_on_hand_made_rows():
    bound = sass.ceiling(sass.pipe_counts(LOOP)).bytes_per_s
    one_pipe = 132 * 1.98e9 * 64 * 64 / (236 + 224 + 115 + 108 + 40)
    below = bound / 1e9 * 0.9
    m = rep.ceiling_macros(SASS_ROWS, [_measured("blake3_gpu", below), _measured("blake3_many_gpu", below),
                                       _measured("blake3_gpu", 5.0, nbytes=2**20)])
    assert m["e3.sass.blake3_gpu.shf"] == "224" and m["e3.sass.blake3_gpu.lop3"] == "236"
    assert m["e3.sass.blake3_gpu.iadd3"] == "115" and m["e3.sass.blake3_gpu.imad"] == "108"
    assert m["e3.sass.blake3_gpu.other"] == "45" and m["e3.sass.blake3_gpu.issue"] == str(sum(LOOP.values()))
    assert m["e3.ceiling.blake3_gpu.tbps"] == f"{bound / 1e12:.2f}"
    assert m["e3.ceiling.blake3_gpu.one_pipe_tbps"] == f"{one_pipe / 1e12:.2f}"
    assert m["e3.ceiling.blake3_gpu.percent"] == "90"  # the largest size measured, not 1 MiB
    assert m["e3.ceiling.blake3_gpu.measured_bytes"] == "4\\,GiB"
    assert m["e3.ceiling.verdict"] == "holds" and m["e3.ceiling.one_pipe_vs_measured"] == "exceeds"
    assert m["e3.ceiling.sms"] == "132" and m["e3.ceiling.pipe_per_clk"] == "64"
    # the paper's formula: SMs x clock x rate / count x 64 B reproduces the ceiling
    rate, count = int(m["e3.ceiling.blake3_gpu.binding_per_clk"]), int(m["e3.ceiling.blake3_gpu.binding_count"])
    assert (m["e3.ceiling.blake3_gpu.binding"], rate, count) == ("ALU", 64, 236 + 224 + 115 + 40)
    assert 132 * 1.98e9 * rate / count * 64 == pytest.approx(bound, rel=1e-12)


def test_ceiling_macros_say_when_exceeded_or_untested():
    bound = sass.ceiling(sass.pipe_counts(LOOP)).bytes_per_s
    over = rep.ceiling_macros(SASS_ROWS, [_measured("blake3_gpu", bound / 1e9 * 0.5),
                                          _measured("blake3_many_gpu", bound / 1e9 * 1.1)])
    assert over["e3.ceiling.verdict"] == "is exceeded"
    assert over["e3.ceiling.blake3_many_gpu.percent"] == "110"
    cpu_only = rep.ceiling_macros(SASS_ROWS, [{**_measured("blake3_gpu", 1.0), "device": "cpu"}])
    assert cpu_only["e3.ceiling.verdict"] == "is not tested"
    assert cpu_only["e3.ceiling.one_pipe_vs_measured"] == "does not test"
    assert cpu_only["e3.ceiling.blake3_gpu.measured_tbps"] == "n/a"
    with pytest.raises(ValueError, match="blake3_many_gpu"):
        rep.ceiling_macros(_sass_rows("blake3_gpu", LOOP), [])


# ---------------------------------------------------------------- config


def test_config_composes_and_names_e3s_launches():
    cfg = compose("e3_sass", E3SassConfig)
    assert cfg.scale == "paper" and cfg.out_dir == "results/paper/e3_sass"
    assert launches(cfg) == {"blake3_gpu": (1, 4 * 2**30), "blake3_many_gpu": (2**17, 32768)}
    expected = SCHEMAS["e3_sass"].expected({"config": asdict(cfg)})  # what load_results demands
    assert expected == [{"impl": i, "n_rows": n, "row_bytes": b} for i, (n, b) in launches(cfg).items()]
    with pytest.raises(ValueError, match="multiple of page_bytes"):
        compose("e3_sass", E3SassConfig, ["page_bytes=3000"])
