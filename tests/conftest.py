import os

import pytest

os.environ.setdefault("XDG_CACHE_HOME", "/tmp/memseg-test-cache")


@pytest.fixture(autouse=True)
def _two_threads():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)
