import os

import pytest

# Keep Ray's session files away from other Ray users of the machine, and never attach to a stray cluster.
os.environ.setdefault("RAY_TMPDIR", "/tmp/kcd_ray_tests")
os.environ.pop("RAY_ADDRESS", None)


@pytest.fixture(scope="session")
def ray_session():
    """One real local Ray for the whole session (about 3 s to start); modules share it."""
    import ray

    if not ray.is_initialized():
        os.makedirs(os.environ["RAY_TMPDIR"], exist_ok=True)
        ray.init(address="local", num_cpus=2, object_store_memory=150 * 2**20, include_dashboard=False,
                 logging_level="WARNING")
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny nets gain nothing from intra-op threads, and on a shared 2-core machine OpenMP spinning made two
    threads 10-40x slower than one: modules of small-model tests run single-threaded."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
