"""The tiny training set-up and random batches shared by the train-step tests."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from eomt_jax import config_lib, train_step
from eomt_jax.mesh import make_mesh

REPO = Path(__file__).resolve().parents[1]


def runlocal_config(name: str = "coco_panoptic_large"):
    """The `:runlocal` variant of a zoo config (tiny model, 64 px, generated data)."""
    return config_lib.load_config_file(str(REPO / "configs" / f"{name}.py") + ":runlocal")


def tiny_setup(config, seed: int = 0):
    """(graphdef, optimizer, learning rates, unsharded initial state, step config) of a config, as a run builds
    them (`eomt_jax.train_step.setup`); the tests shard the state themselves."""
    setup = train_step.setup(config, config_lib.model_config(config), make_mesh([("data", 1)], jax.devices()[:1]))
    return setup.graphdef, setup.tx, setup.learning_rates, setup.init_state(seed), setup.step_config


def random_batch(seed: int, b: int, size: int, slots: int, classes: int, *, targets=(1, 4), box=(8, 16),
                 margin: int = 16) -> dict[str, np.ndarray]:
    """A training batch (`eomt_jax.data.TRAIN_KEYS`) of random images and rectangles: each image gets
    `rng.integers(*targets)` rectangles with sides in `box`, placed at least `margin` pixels from the far edge."""
    rng = np.random.default_rng(seed)
    masks = np.zeros((b, slots, size, size), bool)
    valid = np.zeros((b, slots), bool)
    for i in range(b):
        for j in range(rng.integers(*targets)):
            y, x = rng.integers(0, size - margin, 2)
            masks[i, j, y : y + rng.integers(*box), x : x + rng.integers(*box)] = True
            valid[i, j] = True
    return {"image": rng.integers(0, 255, (b, size, size, 3), dtype=np.uint8), "masks": masks,
            "labels": rng.integers(0, classes, (b, slots)).astype(np.int32), "valid": valid,
            "is_crowd": np.zeros((b, slots), bool)}
