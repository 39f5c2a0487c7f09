"""Generated datasets shared by the data tests (written once per session into a temporary folder)."""

import pytest

from eomt_jax.data import synthetic

# Small images keep the whole data suite fast on a 2-core machine; the readers do not depend on size.
SIZE = 48


@pytest.fixture(scope="session")
def generated(tmp_path_factory):
    """kind -> (folder, ground truth) for every generator kind."""
    out = {}
    for kind, write in synthetic.WRITERS.items():
        root = tmp_path_factory.mktemp(kind)
        num_train = 24 if kind == "shapes" else 10
        out[kind] = (root, write(str(root), num_train=num_train, num_val=5, size=SIZE, seed=3))
    return out
