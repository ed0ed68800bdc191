"""On-chip resources of a Triton kernel compiled for the H200 (sm_90) on any machine.

:func:`compile_resources` compiles one launch with ``triton.compile`` for ``GPUTarget("cuda", 90,
32)`` (no GPU needed) and reads

* shared memory per program from the compiled metadata (Triton allocates it dynamically, so the
  cubin's static ``SHARED`` is 0 and the metadata is the number the launch requests),
* registers per thread from the cubin with Triton's bundled ``cuobjdump --dump-resource-usage``,
* spill stores / loads and the stack frame from Triton's bundled ``ptxas -v`` run on the same PTX.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton

SM90 = ("cuda", 90, 32)


def bundled_tool(name: str) -> str:
    """Path of a tool Triton ships for NVIDIA (cuobjdump, nvdisasm, ptxas)."""
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.exists():
        raise FileNotFoundError(f"Triton's bundled {name} is missing at {path}")
    return str(path)


def _as_jit(fn):
    """A JITFunction for ``fn`` (under TRITON_INTERPRET=1 ``triton.jit`` returns an interpreter
    wrapper, which cannot be compiled; re-wrap its Python function)."""
    from triton.runtime.jit import JITFunction

    if isinstance(fn, JITFunction):
        return fn
    inner = getattr(fn, "fn", None)
    if inner is None:
        raise TypeError(f"jit_fn must be a @triton.jit function, got {type(fn).__name__}")
    return JITFunction(inner)


def parse_cuobjdump(text: str, name: str) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of function ``name`` in ``cuobjdump --dump-resource-usage``."""
    m = re.search(rf"Function {re.escape(name)}:\s*\n\s*(REG:.*)", text)
    if not m:
        raise ValueError(f"no resource line for function {name!r} in cuobjdump output:\n{text}")
    fields = dict(re.findall(r"(\w+(?:\[\d+\])?):(\d+)", m.group(1)))
    return {"registers": int(fields["REG"]), "stack_bytes": int(fields.get("STACK", 0)),
            "static_shared_bytes": int(fields.get("SHARED", 0)), "local_bytes": int(fields.get("LOCAL", 0))}


def parse_ptxas(text: str) -> dict[str, int]:
    """Spill stores / loads, stack frame and registers from ``ptxas -v`` output."""
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", text)
    r = re.search(r"Used (\d+) registers", text)
    if not (m and r):
        raise ValueError(f"unexpected ptxas -v output:\n{text}")
    return {"stack_frame": int(m.group(1)), "spill_stores": int(m.group(2)),
            "spill_loads": int(m.group(3)), "ptxas_registers": int(r.group(1))}


def compile_resources(jit_fn, signature: dict, constexprs: dict, options: dict, attrs: dict | None = None) -> dict:
    """Compile one launch for sm_90 and return its per-program resources.

    signature: argument name -> Triton type (``"*bf16"``, ``"i32"``, ``"constexpr"``...);
    constexprs: name -> value; options: ``num_warps``, ``num_stages``...; attrs: the argument
    specializations a real launch makes (``{(index,): [["tt.divisibility", 16]]}`` for 16-byte
    aligned pointers and strides). Without them the compiler cannot assume aligned, vectorizable
    addresses, and registers and spills come out higher than in a real launch.
    Returns ``shared_bytes`` (dynamic shared memory per program), ``registers`` (per thread),
    ``spill_stores``, ``spill_loads``, ``local_bytes``, ``stack_bytes``, ``num_warps``, ``hash``
    (of the compiled kernel: equal hashes mean the same binary), ``name``.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=_as_jit(jit_fn), signature=dict(signature), constexprs=dict(constexprs), attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget(*SM90), options=dict(options))
    md = kernel.metadata
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptx = os.path.join(tmp, "k.cubin"), os.path.join(tmp, "k.ptx")
        Path(cubin).write_bytes(kernel.asm["cubin"])
        Path(ptx).write_text(kernel.asm["ptx"])
        dump = subprocess.run([bundled_tool("cuobjdump"), "--dump-resource-usage", cubin],
                              capture_output=True, text=True, check=True).stdout
        arch = re.search(r"\.target\s+(\w+)", kernel.asm["ptx"]).group(1)
        ptxas = subprocess.run([bundled_tool("ptxas"), f"-arch={arch}", "-v", ptx, "-o", os.path.join(tmp, "p.cubin")],
                               capture_output=True, text=True, check=True)
    usage = parse_cuobjdump(dump, md.name)
    spills = parse_ptxas(ptxas.stdout + ptxas.stderr)
    return {
        "name": md.name,
        "shared_bytes": int(md.shared) + usage["static_shared_bytes"],
        "registers": usage["registers"],
        "spill_stores": spills["spill_stores"],
        "spill_loads": spills["spill_loads"],
        "local_bytes": usage["local_bytes"],
        "stack_bytes": usage["stack_bytes"],
        "num_warps": int(md.num_warps),
        "hash": md.hash,
    }
