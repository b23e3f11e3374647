import logging
import os

# Tests never touch the network: the hub clients fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Local stand-in servers are reached directly, never through a proxy from the environment.
for _var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
    os.environ.pop(_var, None)

import pytest  # noqa: E402  (after the environment above)
import torch  # noqa: E402

logging.getLogger("diffusers").setLevel(logging.ERROR)
logging.getLogger("transformers").setLevel(logging.ERROR)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_kontext_dir(tmp_path_factory):
    """A saved tiny FLUX.1 Kontext pipeline (1 double + 1 single block), loaded through from_pretrained by tests."""
    from replan.testing import save_tiny_kontext  # here, not at the top: CI's verl environment has no diffusers

    return save_tiny_kontext(tmp_path_factory.mktemp("tiny_kontext"))


@pytest.fixture(scope="session")
def tiny_kontext_one_block_dir(tmp_path_factory):
    """One double-stream block and no single-stream block: hint information cannot travel a second hop."""
    from replan.testing import save_tiny_kontext

    return save_tiny_kontext(tmp_path_factory.mktemp("tiny_kontext_1"), num_layers=1, num_single_layers=0)


@pytest.fixture(autouse=True, scope="session")
def replan_cache(tmp_path_factory):
    """Offline-built components (the ``tiny`` backbone and planner) go to a per-run cache, never ~/.cache."""
    import os

    path = tmp_path_factory.mktemp("replan_cache")
    old = os.environ.get("REPLAN_CACHE")
    os.environ["REPLAN_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("REPLAN_CACHE", None)
    else:
        os.environ["REPLAN_CACHE"] = old
