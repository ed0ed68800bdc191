"""The device Merkle frontier (fieldprint.merkle_frontier): one launch per append, checked against
MerkleTree / DeviceMerkleTree (references on CPU tensors: the blake3 package) and, for the node
hash itself, against blake3 keyed with NODE_KEY. Kernels run on CUDA when present, else in the
Triton interpreter (small capacities: the interpreter takes ~0.3 s per BLAKE3 compression)."""

import os
import random

import blake3 as ref
import pytest
import torch

from fieldprint.merkle import NODE_KEY, DeviceMerkleTree, MerkleTree
from fieldprint.merkle_frontier import MerkleFrontier, level_sizes


@pytest.fixture
def device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton kernel: needs CUDA or TRITON_INTERPRET=1")
    return "cpu"


def _digests(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 32), dtype=torch.uint8, generator=gen)


def _b(x: torch.Tensor) -> bytes:
    return bytes(x.cpu().tolist())


class _Staging:
    """The graph case: one fixed [M, 32] staging buffer, n_new and root_out reused by every append."""

    def __init__(self, frontier: MerkleFrontier, rows: int):
        dev = frontier.device
        self.frontier = frontier
        self.digests = torch.zeros((rows, 32), dtype=torch.uint8, device=dev)
        self.n_new = torch.zeros(1, dtype=torch.int32, device=dev)
        self.root = torch.zeros(32, dtype=torch.uint8, device=dev)

    def append(self, new: torch.Tensor, seed: int, n_new: int | None = None) -> None:
        """Stage ``new`` [k, 32] (CPU), fill the rest of the buffer with junk, append n_new (default k) rows."""
        junk = _digests(self.digests.shape[0], seed)
        junk[: new.shape[0]] = new
        self.digests.copy_(junk)
        self.n_new.fill_(new.shape[0] if n_new is None else n_new)
        self.frontier.append(self.digests, self.n_new, self.root)


def _check_tree(frontier: MerkleFrontier, leaves: torch.Tensor, root_out: torch.Tensor) -> None:
    """root_out, root() and every level's live nodes against MerkleTree and DeviceMerkleTree."""
    n = leaves.shape[0]
    assert frontier.num_leaves == n
    tree = MerkleTree(leaves)
    assert _b(root_out) == _b(tree.root) == _b(frontier.root())
    for h in range(frontier.depth + 1):  # levels above the tree's root hold copies of it
        lvl = tree.levels[min(h, len(tree.levels) - 1)]
        live = -(-n // 2**h)
        assert torch.equal(frontier.level(h)[:live].cpu(), lvl), f"level {h}"


def _run(capacity: int, sizes: list[int], rows: int, device: str, seed: int) -> None:
    frontier = MerkleFrontier(capacity, device)
    staging = _Staging(frontier, rows)
    staging.root.fill_(7)
    grown = DeviceMerkleTree("cpu")
    leaves = torch.empty((0, 32), dtype=torch.uint8)
    for step, k in enumerate(sizes):
        new = _digests(k, seed + step)
        staging.append(new, seed=1000 + seed + step)
        if k:
            leaves = torch.cat([leaves, new])
            grown = grown.append(new)
        if leaves.shape[0] == 0:
            assert torch.all(staging.root.cpu() == 7), "root_out must stay unchanged while the tree is empty"
            assert frontier.num_leaves == 0
            continue
        _check_tree(frontier, leaves, staging.root)
        assert _b(staging.root) == _b(grown.root)
    frontier.check()  # nothing was refused


def test_level_sizes():
    assert level_sizes(1) == [1]
    assert level_sizes(2) == [2, 1]
    assert level_sizes(5) == [5, 3, 2, 1]
    assert level_sizes(8) == [8, 4, 2, 1]
    assert level_sizes(9) == [9, 5, 3, 2, 1]


def test_node_hash_is_blake3_keyed_with_node_key(device):
    frontier = MerkleFrontier(4, device)
    staging = _Staging(frontier, 3)
    a, b, c = (_b(r) for r in _digests(3, 1))
    staging.append(_digests(2, 1), seed=2)
    assert _b(staging.root) == ref.blake3(a + b, key=NODE_KEY).digest()
    staging.append(_digests(3, 1)[2:], seed=3)
    ab = ref.blake3(a + b, key=NODE_KEY).digest()
    assert _b(staging.root) == ref.blake3(ab + c, key=NODE_KEY).digest()  # c promoted, then paired


def test_appends_of_every_kind_until_full(device):
    """Sizes 0, 1, 2, 3, odd, powers of two; the last append fills the capacity exactly."""
    _run(24, [0, 1, 2, 3, 0, 5, 8, 1, 4], rows=8, device=device, seed=10)


def test_random_appends(device):
    rng = random.Random(5)
    capacity, rows, sizes, total = 40, 16, [], 0
    while total < capacity:
        k = min(rng.choice([0, 1, 2, 3, 7, 11, 16]), capacity - total)
        sizes.append(k)
        total += k
    _run(capacity, sizes, rows=rows, device=device, seed=20)


def test_power_of_two_capacity_filled_in_one_append(device):
    _run(16, [16], rows=16, device=device, seed=30)


def test_reset_rolls_back_a_failed_commit(device):
    frontier = MerkleFrontier(16, device)
    staging = _Staging(frontier, 8)
    first, failed, retry = _digests(5, 40), _digests(6, 41), _digests(7, 42)
    staging.append(first, seed=43)
    staging.append(failed, seed=44)
    frontier.reset(5)
    _check_tree(frontier, first, frontier.root())  # reset alone leaves a consistent tree of 5
    staging.append(retry, seed=45)
    _check_tree(frontier, torch.cat([first, retry]), staging.root)
    frontier.reset(0)
    with pytest.raises(ValueError, match="empty tree"):
        frontier.root()
    staging.append(retry[:3], seed=46)
    _check_tree(frontier, retry[:3], staging.root)


def test_out_of_range_n_new_is_refused_on_the_device(device):
    frontier = MerkleFrontier(6, device)
    staging = _Staging(frontier, 4)
    leaves = _digests(4, 50)
    staging.append(leaves, seed=51)
    before = _b(staging.root)
    for bad in (5, -1, 3):  # more rows than staged, negative, more than the capacity left (2)
        staging.append(leaves[:2], seed=52, n_new=bad)
        assert frontier.num_leaves == 4
        assert _b(staging.root) == before  # the unchanged tree's root
    with pytest.raises(ValueError, match=r"n_new was out of range in 3 append\(s\)"):
        frontier.check()
    frontier.check()  # the count was cleared
    staging.append(leaves[:2], seed=53)  # exactly fills the capacity
    _check_tree(frontier, torch.cat([leaves, leaves[:2]]), staging.root)
    staging.append(leaves[:1], seed=54)
    assert frontier.num_leaves == 6
    with pytest.raises(ValueError, match="n_new"):
        frontier.check()


def test_capacity_one(device):
    frontier = MerkleFrontier(1, device)
    assert frontier.depth == 0
    staging = _Staging(frontier, 2)
    leaf, other = _digests(2, 60)
    staging.append(leaf[None], seed=61)
    assert _b(staging.root) == _b(leaf) == _b(frontier.root())  # one leaf: the root is the leaf
    staging.append(other[None], seed=62)
    with pytest.raises(ValueError, match="n_new"):
        frontier.check()
    assert _b(frontier.root()) == _b(leaf)
    frontier.reset(0)
    staging.append(other[None], seed=63)
    assert _b(staging.root) == _b(other)


def test_bad_arguments():
    for capacity, err in ((0, ValueError), (2**31, ValueError), (4.0, TypeError), (True, TypeError)):
        with pytest.raises(err, match="capacity"):
            MerkleFrontier(capacity, "cpu")
    frontier = MerkleFrontier(8, "cpu")
    digests = torch.zeros((4, 32), dtype=torch.uint8)
    n_new = torch.zeros(1, dtype=torch.int32)
    root = torch.zeros(32, dtype=torch.uint8)
    bad = [
        ("digests", TypeError, [digests.numpy(), n_new, root]),
        ("digests", TypeError, [digests.float(), n_new, root]),
        ("digests", ValueError, [torch.zeros((4, 31), dtype=torch.uint8), n_new, root]),
        ("digests", ValueError, [torch.zeros((0, 32), dtype=torch.uint8), n_new, root]),
        ("digests", ValueError, [torch.zeros(32, dtype=torch.uint8), n_new, root]),
        ("digests", ValueError, [torch.zeros((32, 4), dtype=torch.uint8).t(), n_new, root]),
        ("digests", ValueError, [digests.to("meta"), n_new, root]),
        ("n_new", TypeError, [digests, 3, root]),
        ("n_new", TypeError, [digests, n_new.long(), root]),
        ("n_new", ValueError, [digests, torch.zeros(2, dtype=torch.int32), root]),
        ("n_new", ValueError, [digests, torch.zeros((), dtype=torch.int32), root]),
        ("n_new", ValueError, [digests, n_new.to("meta"), root]),
        ("root_out", TypeError, [digests, n_new, root.view(torch.int8)]),
        ("root_out", ValueError, [digests, n_new, torch.zeros(31, dtype=torch.uint8)]),
        ("root_out", ValueError, [digests, n_new, torch.zeros(64, dtype=torch.uint8)[::2]]),
    ]
    for name, err, args in bad:
        with pytest.raises(err, match=name):
            frontier.append(*args)
    for count, err in ((1, ValueError), (-1, ValueError), (0.0, TypeError), (False, TypeError)):
        with pytest.raises(err, match="count"):
            frontier.reset(count)
    for h, err in ((4, ValueError), (-1, ValueError), (1.0, TypeError)):
        with pytest.raises(err, match="h must"):
            frontier.level(h)
    with pytest.raises(ValueError, match="empty tree"):
        frontier.root()
    assert frontier.num_leaves == 0 and not frontier.nodes.any()  # nothing was launched


@pytest.mark.gpu
def test_cuda_graph_replays_append():
    """append captured once on a side stream, replayed with new digests and n_new each time."""
    frontier = MerkleFrontier(64, "cuda")
    staging = _Staging(frontier, 16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile outside the capture (n_new = 0 appends nothing)
        frontier.append(staging.digests, staging.n_new, staging.root)
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        frontier.append(staging.digests, staging.n_new, staging.root)
    assert frontier.num_leaves == 0  # capturing runs nothing
    leaves = torch.empty((0, 32), dtype=torch.uint8)
    for step, k in enumerate([3, 16, 1, 0, 12]):
        new = _digests(k, 70 + step)
        staging.digests.copy_(torch.cat([new, _digests(16 - k, 80 + step)]))
        staging.n_new.fill_(k)
        graph.replay()
        torch.cuda.synchronize()
        leaves = torch.cat([leaves, new])
        _check_tree(frontier, leaves, staging.root)
    frontier.check()
