import os

import pytest

os.environ.setdefault("XDG_CACHE_HOME", "/tmp/memseg-test-cache")


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu skip, with a reason, where no CUDA device is present."""
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _two_threads():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
