"""Static SASS counts of the BLAKE3 chunk kernel for the H200 (sm_90), and the issue ceiling they give.

:func:`loop_counts` compiles :func:`fieldprint.hashing._kernels.chunk_kernel` for
``GPUTarget("cuda", 90, 32)`` exactly as a launch by ``blake3_many`` would compile it (the same
arguments go through Triton's own specialization: types, 16-byte divisibility, ``== 1``
constants; no GPU needed), disassembles the cubin with Triton's bundled ``cuobjdump -sass`` and
counts the instructions of the compression loop by mnemonic. The loop is the kernel's one
backward branch (the ``while b < n_blocks`` over the 16 blocks of a chunk); one iteration is one
BLAKE3 compression (7 rounds x 8 G) per lane, i.e. :data:`BLOCK_BYTES` bytes of input per lane,
so an iteration's counts are the instructions each lane executes per 64 bytes hashed.

:func:`ceiling` turns per-pipe counts into a throughput bound. The model (stated in
:data:`PIPES` and :data:`H200`):

* each of the 4 sub-partitions of an SM issues at most one warp instruction per clock;
* the integer ALU pipe (logic ``LOP3``, funnel shifts ``SHF``, adds ``IADD3``, compares, selects,
  data movement: every vector integer instruction except ``IMAD``/``IMUL``) and the FMA pipe
  (``IMAD``, ``IMUL``: ptxas turns some adds into ``IMAD.IADD``) each accept a warp instruction
  every second clock per sub-partition (16 lanes): 64 results per clock per SM each, and they
  run concurrently (separate dispatch ports);
* uniform-datapath, memory, barrier and branch instructions take an issue slot and are not
  otherwise bounded (they are few in the loop).

So an SM completes at most ``min(128 / issued, 64 / alu, 64 / fma)`` loop iterations (64 bytes
each) per clock, and the GPU hashes at most ``SMs x clock x 64 B x that``. Every number is an
upper bound: the boost clock, no stalls, no memory limit.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# torch, Triton and the kernels are imported where a kernel is compiled: the report imports this
# module for the ceiling model alone and stays free of them.

WARP = 32  # lanes of a warp: one warp instruction is WARP lane-instructions
BLOCK_BYTES = 64  # a BLAKE3 block: the input one compression (one loop iteration) consumes per lane
ROUNDS, G_PER_ROUND, ROTATIONS_PER_G = 7, 8, 4  # the BLAKE3 compression function


@dataclass(frozen=True)
class Machine:
    """What the ceiling needs of a GPU."""

    name: str
    sms: int
    clock_hz: float
    sub_partitions: int  # per SM, each issuing one warp instruction per clock
    pipe_lanes: Mapping[str, int]  # lanes per sub-partition of each bounded pipe
    hbm_bytes_per_s: float


# H200 SXM (GH100, sm_90): public figures, not measured here.
# * 132 SMs, 1980 MHz maximum boost clock, 4.8 TB/s HBM3e: H200 SXM specification listings (their
#   FP32 peak, 66.9 TFLOPS, is 132 SMs x 128 lanes x 2 x 1.98 GHz).
# * 4 sub-partitions per SM, each with one warp scheduler (Volta to Hopper): NVIDIA developer
#   forum, https://forums.developer.nvidia.com/t/mapping-of-pipelines-to-functional-units/315200/2
# * ALU pipe (INT32 except IMAD, logical, binary and data-movement instructions) and FMA pipe (IMAD)
#   with separate dispatch ports, 16 lanes, 2 cycles per warp instruction: NVIDIA developer forum on
#   GV100, https://forums.developer.nvidia.com/t/int-32-and-fp64-can-be-used-concurrently-in-the-volta-architecture/108729/4
#   ; GH100 keeps IMAD on the FMA(-heavy) pipe and a sub-partition issues at most one instruction
#   per cycle: https://forums.developer.nvidia.com/t/separate-cuda-core-pipeline-for-fp16-and-fp32/302018
# * 16 lanes x 4 sub-partitions = 64 results per clock per SM: the CUDA C Programming Guide's
#   arithmetic-instruction throughput for 32-bit integer add, shift, compare, bitwise and
#   multiply-add (the copy of the table we could consult lists compute capability up to 7.x).
H200 = Machine(
    name="NVIDIA H200 SXM", sms=132, clock_hz=1.98e9, sub_partitions=4,
    pipe_lanes={"alu": 16, "fma": 16}, hbm_bytes_per_s=4.8e12)

# Pipe of each opcode (the mnemonic before its first dot) that the ceiling model bounds; every
# other vector instruction is counted on the ALU pipe (an unknown opcode can only lower the
# ceiling), and the rest (uniform datapath, memory, barriers, branches) only take issue slots.
FMA_OPCODES = frozenset({"IMAD", "IMUL"})
ISSUE_ONLY_PREFIX = "U"  # uniform datapath: ULDC, UIADD3, USHF, ... (one per warp, not per lane)
ISSUE_ONLY_OPCODES = frozenset({
    "LDG", "STG", "LDS", "STS", "LDSM", "STSM", "LDC", "LD", "ST", "LDL", "STL", "ATOM", "ATOMG",
    "RED", "BAR", "BRA", "BRX", "EXIT", "BSSY", "BSYNC", "WARPSYNC", "NOP", "S2R", "S2UR",
    "DEPBAR", "MEMBAR", "YIELD", "CALL", "RET",
})
PIPES = ("alu", "fma", "issue")


def pipe_of(mnemonic: str) -> str:
    """The pipe the model charges ``mnemonic`` (e.g. ``"IMAD.IADD"``) to: alu, fma or issue."""
    opcode = mnemonic.split(".", 1)[0]
    if not re.fullmatch(r"[A-Z][A-Z0-9_]*", opcode):
        raise ValueError(f"mnemonic must be a SASS mnemonic such as 'LOP3.LUT', got {mnemonic!r}")
    if opcode in FMA_OPCODES:
        return "fma"
    if opcode in ISSUE_ONLY_OPCODES or opcode.startswith(ISSUE_ONLY_PREFIX):
        return "issue"
    return "alu"


# ---------------------------------------------------------------- the launch and its compile


def chunk_launch(n_rows: int, row_bytes: int) -> tuple[tuple, dict]:
    """Arguments of the ``chunk_kernel`` launch ``blake3_many`` makes for ``[n_rows, row_bytes]``
    uint8 rows (unkeyed), as ``(args, kwargs)``; the buffers are meta tensors (no memory; their
    address 0 is 16-byte aligned, as the CUDA allocator's are). tests/test_sass.py checks this
    against the launch ``fieldprint.hashing`` actually makes."""
    import torch

    from fieldprint import hashing

    for name, v in (("n_rows", n_rows), ("row_bytes", row_bytes)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    words = (row_bytes + 3) // 4
    chunks = max(1, -(-row_bytes // hashing.K.CHUNK_LEN))
    n_blocks = min(16, max(1, -(-row_bytes // BLOCK_BYTES)))
    kw, kf = hashing._key_args(None)
    x = torch.empty((n_rows, max(words, 1)), dtype=torch.int32, device="meta")
    out = torch.empty((n_rows * chunks, 8), dtype=torch.int32, device="meta")
    args = (x, out, n_rows * chunks, chunks, row_bytes, words, n_blocks, *kw, kf)
    kwargs = {"BLOCK": hashing.CHUNK_BLOCK, "ALIGNED": words % 16 == 0,
              "num_warps": hashing.CHUNK_BLOCK // 32}
    return args, kwargs


def compile_launch(jit_fn, args: tuple, kwargs: dict):
    """Compile ``jit_fn[grid](*args, **kwargs)`` for sm_90 the way Triton's JIT would on an H200
    (its binder specializes the arguments), without a GPU. Returns Triton's CompiledKernel."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler import compile as triton_compile
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from fieldprint.sram import SM90

    if not isinstance(jit_fn, JITFunction):
        raise RuntimeError(f"compile_launch needs a compiled @triton.jit function, got "
                           f"{type(jit_fn).__name__}: unset TRITON_INTERPRET (the interpreter replaces "
                           "@triton.jit functions) and run it in a fresh process")
    target = GPUTarget(*SM90)
    backend = make_backend(target)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound, specialization,
                                                              options)
    return triton_compile(ASTSource(jit_fn, signature, constexprs, attrs), target=target,
                   options=options.__dict__)


# ---------------------------------------------------------------- SASS


@dataclass(frozen=True)
class Instruction:
    address: int
    mnemonic: str  # opcode with its modifiers, e.g. "SHF.L.W.U32.HI"
    operands: str


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of ``cuobjdump -sass`` output (one function), in address order."""
    out = [Instruction(int(m.group(1), 16), m.group(2), m.group(3).strip())
           for m in map(_LINE.search, text.splitlines()) if m]
    if not out:
        raise ValueError("no SASS instructions found in the cuobjdump output")
    return out


def loop_body(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the kernel's one loop: from the target of its backward branch to the
    branch itself. A branch to itself (the trap after EXIT) is not a loop; any other count of
    backward branches is an error (the compiler unrolled, split or nested the loop)."""
    back = []
    for ins in instructions:
        if ins.mnemonic.split(".", 1)[0] == "BRA":
            m = re.match(r"(?:`?\(?)0x([0-9a-f]+)", ins.operands)
            if m is None:
                raise ValueError(f"cannot read the target of {ins.mnemonic} {ins.operands!r} "
                                 f"at {ins.address:#x}")
            target = int(m.group(1), 16)
            if target < ins.address:
                back.append((target, ins.address))
    if len(back) != 1:
        raise ValueError(f"expected one loop (one backward branch), found {len(back)}: "
                         f"{[(hex(t), hex(a)) for t, a in back]}")
    start, end = back[0]
    return [ins for ins in instructions if start <= ins.address <= end]


def count_mnemonics(instructions: list[Instruction]) -> dict[str, int]:
    """{mnemonic: count}, sorted by mnemonic."""
    return dict(sorted(Counter(ins.mnemonic for ins in instructions).items()))


def disassemble(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin (Triton's bundled cuobjdump)."""
    from fieldprint.sram import bundled_tool

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        return subprocess.run([bundled_tool("cuobjdump"), "-sass", path], capture_output=True,
                              text=True, check=True).stdout


def loop_counts(n_rows: int, row_bytes: int) -> tuple[dict[str, int], str]:
    """Per-iteration instruction counts of the compression loop of ``chunk_kernel`` as
    ``blake3_many`` launches it for ``[n_rows, row_bytes]`` rows, compiled for sm_90:
    ``({mnemonic: count}, sha256 of the cubin)``. Needs TRITON_INTERPRET unset (see
    :func:`compile_launch`); about 10 s on a CPU."""
    from fieldprint.hashing import _kernels as K

    args, kwargs = chunk_launch(n_rows, row_bytes)
    kernel = compile_launch(K.chunk_kernel, args, kwargs)
    body = loop_body(parse_sass(disassemble(kernel.asm["cubin"])))
    return count_mnemonics(body), hashlib.sha256(kernel.asm["cubin"]).hexdigest()


# ---------------------------------------------------------------- the ceiling


def pipe_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """{"alu": n, "fma": n, "issue": n} per iteration from {mnemonic: count}; ``issue`` counts
    every instruction (each takes an issue slot), the others only their pipe's."""
    out = {p: 0 for p in PIPES}
    for mnemonic, n in counts.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"count of {mnemonic!r} must be a non-negative int, got {n!r}")
        pipe = pipe_of(mnemonic)
        if pipe != "issue":
            out[pipe] += n
        out["issue"] += n
    if out["issue"] == 0:
        raise ValueError("counts must hold at least one instruction")
    return out


def pipe_rates(machine: Machine = H200) -> dict[str, int]:
    """Lane-instructions per SM and clock that each limit of the model sustains: ``issue`` (one
    warp instruction per sub-partition and clock) and each bounded pipe (its lanes)."""
    return {"issue": machine.sub_partitions * WARP,
            **{pipe: machine.sub_partitions * lanes for pipe, lanes in machine.pipe_lanes.items()}}


@dataclass(frozen=True)
class Ceiling:
    """The bound of :func:`ceiling`: ``bytes_per_s`` and the limit (``alu``, ``fma`` or
    ``issue``) that sets it."""

    bytes_per_s: float
    binding: str


def ceiling(pipes: Mapping[str, int], machine: Machine = H200) -> Ceiling:
    """Upper bound on the bytes per second a kernel whose loop iteration (``BLOCK_BYTES`` per
    lane) has ``pipes`` instructions per pipe (:func:`pipe_counts`) can hash on ``machine``:
    ``SMs x clock x BLOCK_BYTES x min over limits of (rate / count)``."""
    missing = set(PIPES) - set(pipes)
    if missing:
        raise ValueError(f"pipes must give a count for each of {PIPES}, missing {sorted(missing)}")
    if pipes["issue"] < pipes["alu"] + pipes["fma"] or pipes["issue"] <= 0:
        raise ValueError(f"pipes['issue'] counts every instruction: must be positive and at least "
                         f"alu + fma, got {dict(pipes)}")
    # loop iterations per SM and clock that each limit allows (a pipe with no work allows any)
    allowed = {pipe: rate / pipes[pipe] for pipe, rate in pipe_rates(machine).items() if pipes[pipe]}
    binding = min(allowed, key=allowed.get)
    return Ceiling(machine.sms * machine.clock_hz * allowed[binding] * BLOCK_BYTES, binding)
