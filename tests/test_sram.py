"""sm_90 resources of a tiny kernel of this test's own: shared memory grows with the tile, an
unrolled register-hungry kernel spills, and the parsers read the tools' formats."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton.language as tl
from triton.runtime.jit import JITFunction

from fieldprint import sram


def _dot_tile(x, y, out, BLOCK: tl.constexpr):
    # Forces a shared-memory staged tl.dot of two BLOCK x BLOCK bf16 tiles.
    r = tl.arange(0, BLOCK)
    a = tl.load(x + r[:, None] * BLOCK + r[None, :])
    b = tl.load(y + r[:, None] * BLOCK + r[None, :])
    tl.store(out + r[:, None] * BLOCK + r[None, :], tl.dot(a, b))


# Built explicitly (not with @triton.jit): under TRITON_INTERPRET=1 the decorator returns an
# interpreter wrapper, and this test must compile real PTX whatever the environment says.
DOT_TILE = JITFunction(_dot_tile)
SIG = {"x": "*bf16", "y": "*bf16", "out": "*fp32", "BLOCK": "constexpr"}


def _measure(blocks):
    """compile_resources for each BLOCK, in a fresh process without TRITON_INTERPRET: once other
    tests have run interpreted kernels in this process, Triton's language builtins stay patched
    for the interpreter and real code generation fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import json, sys; sys.path.insert(0, 'tests'); import test_sram as t; "
            f"print(json.dumps([t.sram.compile_resources(t.DOT_TILE, t.SIG, {{'BLOCK': n}}, "
            f"{{'num_warps': 4}}) for n in {list(blocks)}]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def small_and_big():
    return _measure((32, 64, 32))


def test_shared_memory_tracks_the_tile(small_and_big):
    small, big = small_and_big[:2]
    # Two bf16 operands staged in shared memory, 2 * n * n * 2 bytes, plus a fixed scratch
    # (1 KiB with triton 3.6) that does not depend on the tile.
    operands = [2 * n * n * 2 for n in (32, 64)]
    assert big["shared_bytes"] - small["shared_bytes"] == operands[1] - operands[0]
    assert 0 <= small["shared_bytes"] - operands[0] <= 2048
    for r in small_and_big[:2]:
        assert 16 <= r["registers"] <= 255 and r["spill_stores"] == 0 and r["local_bytes"] == 0
        assert r["name"] == "_dot_tile" and r["num_warps"] == 4
    assert small["hash"] != big["hash"]


def test_same_spec_same_binary(small_and_big):
    assert small_and_big[2] == small_and_big[0]


def test_parsers_and_bad_input():
    dump = ("Resource usage:\n Common:\n  GLOBAL:0\n Function kern:\n"
            "  REG:168 STACK:16 SHARED:0 LOCAL:24 CONSTANT[0]:600 TEXTURE:0\n")
    assert sram.parse_cuobjdump(dump, "kern") == {
        "registers": 168, "stack_bytes": 16, "static_shared_bytes": 0, "local_bytes": 24}
    with pytest.raises(ValueError, match="other"):
        sram.parse_cuobjdump(dump, "other")
    ptxas = ("ptxas info    : Function properties for kern\n"
             "    16 bytes stack frame, 20 bytes spill stores, 12 bytes spill loads\n"
             "ptxas info    : Used 255 registers, used 1 barriers\n")
    assert sram.parse_ptxas(ptxas) == {"stack_frame": 16, "spill_stores": 20, "spill_loads": 12,
                                       "ptxas_registers": 255}
    with pytest.raises(ValueError, match="ptxas"):
        sram.parse_ptxas("garbage")
    with pytest.raises(TypeError, match="jit_fn"):
        sram.compile_resources(lambda: None, SIG, {"BLOCK": 32}, {})
