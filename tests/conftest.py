import os
import tempfile

import pytest
import torch

# One kernel cache per test session: tests exercise cold compiles without touching the user's cache.
os.environ.setdefault("FUSEBACKEND_CACHE_DIR", tempfile.mkdtemp(prefix="fusebackend-test-cache-"))
# No program cache unless a test asks for it (tests/test_program_cache.py): a test that replaces a compile stage
# (lowering, emission, the C++ compiler) must see that stage run, not a program an earlier test cached.
os.environ.setdefault("FUSEBACKEND_PROGRAM_CACHE", "0")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
