"""BLAKE3 (fieldprint.hashing) against the `blake3` package and the official test vectors
(tests/data/blake3_test_vectors.json).

The Triton kernels run in the CPU interpreter (slow), so their cases stay at a few KB; the
lengths are chosen to hit each code path: empty input, partial last block, exactly one chunk
(the chunk is the root), two chunks (a parent is the root), odd chunk counts (a node carried up),
word-aligned and unaligned rows, several rows in one launch.
"""

import hashlib
import json
import random
from pathlib import Path

import blake3 as ref
import pytest
import torch

from fieldprint.hashing import blake3, blake3_many

# The official vectors, copied into the repository (provenance and licence: tests/data/README.md).
VECTORS = Path(__file__).resolve().parent / "data" / "blake3_test_vectors.json"
VECTORS_SHA256 = "dcb91ea8accc77e6d6e632af7cdc1a99a9f3ae78cf648da595c7d064db32f624"
VECTOR_KEY = b"whats the Elvish word for friend"
VECTOR_LENS = [0, 1, 2, 3, 4, 5, 6, 7, 8, 63, 64, 65, 127, 128, 129, 1023, 1024, 1025, 2048, 2049,
               3072, 3073, 4096, 4097, 5120, 5121, 6144, 6145, 7168, 7169, 8192, 8193, 16384,
               31744, 102400]


def _rand(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)


def _ref(data: torch.Tensor, key: bytes | None = None) -> bytes:
    b = bytes(data.tolist())
    return (ref.blake3(b, key=key) if key else ref.blake3(b)).digest()


def _vector_input(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64).remainder(251).to(torch.uint8)


def _key(gen: torch.Generator) -> bytes:
    return bytes(_rand(gen, 32).tolist())


@pytest.mark.parametrize("length", [0, 1, 63, 64, 65, 1023, 1024, 1025, 2048, 3072, 3073, 8193,
                                    65536 + 17])
def test_reference_backend_matches_package(length):
    gen = torch.Generator().manual_seed(length)
    data = _rand(gen, length)
    key = _key(gen)
    assert bytes(blake3(data).tolist()) == _ref(data)
    assert bytes(blake3(data, key=key, backend="reference").tolist()) == _ref(data, key)
    assert bytes(blake3(data, key=torch.tensor(list(key), dtype=torch.uint8)).tolist()) == \
        _ref(data, key)


@pytest.fixture(scope="module")
def vectors() -> dict[int, dict]:
    """The official cases by input length, from the unchanged copy of the vector file."""
    raw = VECTORS.read_bytes()
    assert hashlib.sha256(raw).hexdigest() == VECTORS_SHA256, f"{VECTORS} differs from the official file"
    doc = json.loads(raw)
    assert doc["key"].encode() == VECTOR_KEY
    cases = {c["input_len"]: c for c in doc["cases"]}
    assert sorted(cases) == VECTOR_LENS
    return cases


def test_official_vectors_against_package(vectors):
    """The official cases (i % 251 inputs, plain and keyed) through the public API, and the
    package on the same inputs (so a disagreement says which side is wrong)."""
    for n in VECTOR_LENS:
        data = _vector_input(n)
        plain = bytes(blake3(data).tolist())
        keyed = bytes(blake3(data, key=VECTOR_KEY).tolist())
        assert plain == _ref(data)
        assert keyed == _ref(data, VECTOR_KEY)
        assert plain.hex() == vectors[n]["hash"][:64]
        assert keyed.hex() == vectors[n]["keyed_hash"][:64]


@pytest.mark.parametrize("length,keyed", [(0, False), (65, True), (3072, True)])
def test_official_vectors_triton(vectors, length, keyed):
    data = _vector_input(length)
    got = blake3(data, key=VECTOR_KEY if keyed else None, backend="triton")
    assert bytes(got.tolist()).hex() == vectors[length]["keyed_hash" if keyed else "hash"][:64]


@pytest.mark.parametrize("length,keyed", [(0, True), (1, False), (63, True), (64, False),
                                          (129, True), (500, False)])
def test_triton_short_inputs(length, keyed):
    """Inputs of at most one chunk: the chunk's last block carries ROOT. The key starts with
    the word 1 (which Triton would specialize into a constant unless told not to)."""
    gen = torch.Generator().manual_seed(100 + length)
    data = _rand(gen, length)
    key = (1).to_bytes(4, "little") + _key(gen)[4:] if keyed else None
    assert bytes(blake3(data, key=key, backend="triton").tolist()) == _ref(data, key)


@pytest.mark.parametrize("length,rows,keyed", [(1024, 2, True), (1025, 3, False),
                                               (4096, 2, False), (33 * 1024 + 1, 2, True)])
def test_triton_many_multi_chunk(length, rows, keyed):
    """Several rows in one launch. Chunks per row: 1 (the chunk is the root), 2 (root parent on
    the first level of a parent launch), 4 (root on the second level), 34 (three parent launches,
    34 -> 9 -> 3 -> 1, nodes carried up). Rows of a multiple of 64 bytes take the aligned load
    path, the others the padded one. (3 chunks, keyed: the official vector 3072 above.)"""
    gen = torch.Generator().manual_seed(length)
    data = _rand(gen, rows, length)
    key = _key(gen) if keyed else None
    got = blake3_many(data, key=key, backend="triton")
    assert got.shape == (rows, 32) and got.dtype == torch.uint8
    for r in range(rows):
        assert bytes(got[r].tolist()) == _ref(data[r], key), f"row {r}"


def test_triton_random_length_unaligned_pointer():
    """A random length of 2-3 chunks from a buffer whose data pointer is not word aligned."""
    rng = random.Random(7)
    length = rng.randrange(1100, 2100)
    gen = torch.Generator().manual_seed(7)
    buf = _rand(gen, length + 1)
    data = buf[1:]
    assert data.data_ptr() % 4 != 0
    assert bytes(blake3(data, backend="triton").tolist()) == _ref(data)


def test_many_reference_and_empty_batch():
    gen = torch.Generator().manual_seed(3)
    rows = _rand(gen, 5, 777)
    key = _key(gen)
    got = blake3_many(rows, key=key)
    assert [bytes(r.tolist()) for r in got] == [_ref(r, key) for r in rows]
    assert blake3_many(torch.empty((0, 10), dtype=torch.uint8)).shape == (0, 32)
    assert blake3_many(torch.empty((0, 10), dtype=torch.uint8), backend="triton").shape == (0, 32)


def test_distinct_rows_distinct_digests():
    """Rows differing in one bit hash differently; the same bytes hash the same in any row."""
    rows = torch.zeros((3, 2049), dtype=torch.uint8)
    rows[1, 2048] = 1
    got = blake3_many(rows, backend="reference")
    assert torch.equal(got[0], got[2]) and not torch.equal(got[0], got[1])


@pytest.mark.parametrize("fn", [blake3, blake3_many])
def test_bad_inputs(fn, monkeypatch):
    ok = torch.zeros(8, dtype=torch.uint8) if fn is blake3 else torch.zeros((2, 8), dtype=torch.uint8)
    name = "data" if fn is blake3 else "rows"
    with pytest.raises(TypeError, match=name):
        fn(ok.tolist())
    with pytest.raises(TypeError, match=name):
        fn(ok.to(torch.int32))
    with pytest.raises(ValueError, match=name):
        fn(ok.reshape(1, -1) if fn is blake3 else ok.reshape(-1))
    wide = torch.zeros((4, 16), dtype=torch.uint8)
    with pytest.raises(ValueError, match="contiguous"):
        fn(wide[:, 0] if fn is blake3 else wide[:, ::2])
    with pytest.raises(ValueError, match="key"):
        fn(ok, key=b"short")
    with pytest.raises(ValueError, match="key"):
        fn(ok, key=torch.zeros(31, dtype=torch.uint8))
    with pytest.raises(TypeError, match="key"):
        fn(ok, key="x" * 32)
    with pytest.raises(TypeError, match="key"):
        fn(ok, key=torch.zeros(32, dtype=torch.int32))
    with pytest.raises(ValueError, match="backend"):
        fn(ok, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fn(ok, backend="triton")


# The GPU test's cases: (rows, length) -> what each one covers. Triton compiles one kernel per
# specialization of the integer arguments (each is specialized on == 1 and on being a multiple of
# 16), and each BLAKE3 compile takes a while, so the cases are chosen to need nine compiles in
# all (six chunk_kernel, three parent_kernel) rather than one per length: the unaligned multi-chunk
# cases share one chunk_kernel specialization (no count, length or word count a multiple of 16),
# and no tree level of any of them has a node count that is a multiple of 16.
GPU_CASES = [
    (1, 0),                # empty input (same specialization as the next)
    (1, 64),               # exactly one block, aligned loads
    (1, 37),               # less than one block, padded loads
    (1, 1000),             # 16 blocks, partial last: the chunk is the root
    (1, 1024),             # exactly one chunk
    (3, 1025),             # 2 chunks per row: the root is a parent
    (3, 4 * 1024 + 7),     # 5 chunks: an odd node carried up
    (3, 33 * 1024 + 1),    # 34 chunks: 34 -> 9 -> 3 -> 1, two parent launches
    (3, 5 * 1024),         # 5 whole chunks per row: aligned loads across chunks
    (3, (1 << 20) + 3),    # 1025 chunks: six tree levels
    (1, (1 << 22) + 3),    # 4097 chunks of one row (blake3(), not blake3_many)
]


@pytest.mark.gpu
@pytest.mark.parametrize("rows,length", GPU_CASES)
def test_gpu_matches_package(rows, length):
    gen = torch.Generator().manual_seed(length)
    data = _rand(gen, rows, length)
    key = _key(gen)
    dev = data.cuda()
    for k in (None, key):
        got = blake3(dev[0], key=k) if rows == 1 else blake3_many(dev, key=k)
        got = got.view(-1, 32).cpu()
        assert [bytes(r.tolist()) for r in got] == [_ref(data[r], k) for r in range(rows)], (length, k)
