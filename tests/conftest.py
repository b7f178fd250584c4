import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and a busy 2-core machine then causes no OpenMP
    barrier stalls; modules opt in with pytestmark = pytest.mark.usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One data-index cache folder for the session's tiny training runs (forge.data.cache keys
    its entries by what they are built from, so runs share what is the same)."""
    return str(tmp_path_factory.mktemp("forge_data_cache"))
