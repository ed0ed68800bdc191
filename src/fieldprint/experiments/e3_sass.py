"""E3's hashing launches as the H200 would run them: SASS instruction counts of BLAKE3's
compression loop, compiled for sm_90 on any machine (no GPU; seconds).

One row per (impl, mnemonic): how many times the loop of ``chunk_kernel`` issues that instruction
per iteration, i.e. per lane and 64-byte block (:mod:`fieldprint.sass`), for the two launches
E3 times at its largest size:

  blake3_gpu       one message of ``total_bytes`` (one row of ``blake3_many``)
  blake3_many_gpu  ``total_bytes`` cut into rows of ``page_bytes`` (E3's bf16 pages)

``report/e3_hash.py`` turns the counts into the integer-issue ceiling (:func:`fieldprint.sass.ceiling`)
and sets it against E3's measurement of the same impls.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fieldprint.experiments.common import ExperimentConfig, check, hydra_main


@dataclass
class E3SassConfig(ExperimentConfig):
    out_dir: str = "results/paper/e3_sass"
    total_bytes: int = 4 * 2**30  # E3's largest size (configs/e3_hash/paper.yaml)
    page_bytes: int = 32768  # E3's pages: 16384 bf16 elements

    def validate(self) -> None:
        super().validate()
        check(self.page_bytes > 0 and self.total_bytes > 0 and self.total_bytes % self.page_bytes == 0,
              f"total_bytes ({self.total_bytes}) must be a positive multiple of page_bytes ({self.page_bytes})")


def launches(cfg: E3SassConfig) -> dict[str, tuple[int, int]]:
    """{impl: (rows, bytes per row)} of the chunk-kernel launches compiled."""
    return {"blake3_gpu": (1, cfg.total_bytes),
            "blake3_many_gpu": (cfg.total_bytes // cfg.page_bytes, cfg.page_bytes)}


def run(cfg: E3SassConfig) -> list[dict]:
    from fieldprint.sass import loop_counts

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise ValueError("E3's SASS counts compile real sm_90 kernels: run without TRITON_INTERPRET=1")
    rows = []
    for impl, (n_rows, row_bytes) in launches(cfg).items():
        counts, cubin_sha256 = loop_counts(n_rows, row_bytes)
        rows += [{"impl": impl, "n_rows": n_rows, "row_bytes": row_bytes, "mnemonic": mnemonic,
                  "count": n, "cubin_sha256": cubin_sha256} for mnemonic, n in counts.items()]
    return rows


if __name__ == "__main__":
    hydra_main("e3_sass", E3SassConfig, run)
