"""One real deployment (stack.py) for the whole reliability suite: started once, shared.

Order: the privacy audit (test_privacy.py) runs last, over every call and log line the other
tests caused; the soak runs before the faults, on a healthy deployment.
"""

from pathlib import Path

import pytest
from reliability.stack import start_stack

_ORDER = ("test_store_bounds", "test_ray_auth", "test_bad_input", "test_cloud_actor", "test_tenants", "test_soak",
          "test_faults", "test_privacy")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent

    def rank(item):  # (this hook sees every test of the session: only ours move, to the end)
        name = item.path.stem
        return _ORDER.index(name) if item.path.parent == here and name in _ORDER else -1

    items.sort(key=rank)  # stable: the order inside each module stays


@pytest.fixture(scope="session")
def stack(tiny_model, tmp_path_factory):
    s = start_stack(tiny_model, tmp_path_factory.mktemp("reliability"))
    try:
        yield s
    finally:
        s.close()
