import os

import pytest
import torch

# Without a GPU, Triton kernels run in its interpreter on CPU tensors. Must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:  # imported now, under that setting: a test that first imports it with TRITON_INTERPRET=0 (a clear-error
        # test does) would leave every later kernel compiled for a GPU, failing the interpreter tests after it
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError:
        pass


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (run with -m gpu)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
