"""Shared test set-up: without a GPU, Triton kernels run in the interpreter; torch uses one thread.

TRITON_INTERPRET must be set before any module decorates a kernel, so it is set here, before
test modules are imported.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The tests use tiny tensors: one thread avoids OpenMP oversubscription on a 2-core CI machine
# (measured: tiny nn.Linear calls took ~17 ms each with 2 threads on a busy machine).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
