"""Where a run's dataset lives: `config.data.root`, or a generated dataset in the workdir."""

from __future__ import annotations

import logging
from pathlib import Path

import jax
import ml_collections

from eomt_jax.data import synthetic
from eomt_jax.distributed import barrier

log = logging.getLogger("eomt_jax")


def dataset_root(data: ml_collections.ConfigDict, workdir: Path) -> Path:
    """The dataset folder of a config's `data` section; when `data.generate` names a generated kind, it is generated
    into `data.root` (default `<workdir>/data`) on first use, by process 0, while the others wait."""
    if not data.generate:
        if not data.root:
            raise ValueError("config.data.root is empty: set --config.data.root to the folder with the dataset zips")
        return Path(data.root)
    root = Path(data.root) if data.root else Path(workdir) / "data"
    marker = root / ".complete"
    if not marker.exists():
        if jax.process_index() == 0:
            log.info("generating the %s dataset into %s", data.generate, root)
            synthetic.generate(data.generate, root, **dict(data.generate_kwargs))
            marker.write_text("ok\n")
        barrier("data generation")
    return root
