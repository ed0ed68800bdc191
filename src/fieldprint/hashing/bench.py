"""GPU self-check and throughput of the Triton BLAKE3 (run on a CUDA machine).

    python -m fieldprint.hashing.bench [--max-gb 4] [--check-only]

1. Checks `blake3` / `blake3_many` (Triton) against the `blake3` package, plain and keyed, on
   edge lengths and random lengths up to 64 MB, and on a batch of KV-page-sized rows.
2. Prints GB/s of input for one buffer of 1 MB .. max-gb GB and for blake3_many over 16 KB rows,
   next to the `blake3` package on the host (all its threads) for scale.
Exit status 1 if any digest differs.
"""

import argparse
import random
import sys
import time

import torch

from fieldprint.hashing import blake3, blake3_many
from fieldprint.timing import bench

MB = 1 << 20


def _ref(data: torch.Tensor, key: bytes | None) -> bytes:
    import blake3 as ref

    b = data.cpu().numpy().tobytes()
    h = ref.blake3(b, key=key, max_threads=ref.blake3.AUTO) if key else \
        ref.blake3(b, max_threads=ref.blake3.AUTO)
    return h.digest()


def self_check(seed: int = 0) -> int:
    rng = random.Random(seed)
    lengths = [0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 2049, 3072, 3073, 4096, 8193,
               1 << 16, (1 << 20) + 1, 64 * MB] + [rng.randrange(1, 64 * MB) for _ in range(12)]
    key = bytes(rng.randrange(256) for _ in range(32))
    bad = 0
    for n in lengths:
        data = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 256)
        for k in (None, key):
            got = bytes(blake3(data, key=k).cpu().tolist())
            if got != _ref(data, k):
                bad += 1
                print(f"MISMATCH length={n} keyed={k is not None}")
    # unaligned start (copy path) and a batch of page-sized rows
    buf = torch.empty(5 * MB + 3, dtype=torch.uint8, device="cuda").random_(0, 256)
    if bytes(blake3(buf[3:]).cpu().tolist()) != _ref(buf[3:], None):
        bad += 1
        print("MISMATCH unaligned 5 MB")
    for length in (16384 + 64, 4160, 1000):
        rows = torch.empty((257, length), dtype=torch.uint8, device="cuda").random_(0, 256)
        got = blake3_many(rows, key=key).cpu()
        for i in range(rows.shape[0]):
            if bytes(got[i].tolist()) != _ref(rows[i], key):
                bad += 1
                print(f"MISMATCH blake3_many row {i} length {length}")
                break
    total = 2 * len(lengths) + 4
    print(f"self-check: {total - bad}/{total} cases bit-identical to the blake3 package")
    return bad


def throughput(max_gb: float) -> None:
    print(f"{'case':<28}{'bytes':>14}{'ms':>10}{'GB/s':>10}")
    n = MB
    while n <= max_gb * (1 << 30):
        data = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 256)
        ms = bench(lambda d=data: blake3(d), "cuda")
        print(f"{'blake3 (one buffer)':<28}{n:>14}{ms:>10.3f}{n / ms / 1e6:>10.1f}")
        del data
        n *= 4
    for rows in (256, 4096, 65536):
        pages = torch.empty((rows, 16384), dtype=torch.uint8, device="cuda").random_(0, 256)
        ms = bench(lambda p=pages: blake3_many(p), "cuda")
        print(f"{f'blake3_many {rows} x 16 KB':<28}{pages.numel():>14}{ms:>10.3f}"
              f"{pages.numel() / ms / 1e6:>10.1f}")
        del pages
    host = torch.empty(256 * MB, dtype=torch.uint8).random_(0, 256)
    t0 = time.perf_counter()
    _ref(host, None)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"{'blake3 package, host':<28}{host.numel():>14}{ms:>10.3f}{host.numel() / ms / 1e6:>10.1f}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-gb", type=float, default=4.0, help="largest single buffer, GiB")
    p.add_argument("--check-only", action="store_true", help="skip the throughput table")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    bad = self_check()
    if not args.check_only:
        throughput(args.max_gb)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
