"""Config values that cannot work are refused before anything is built, all at once, each naming its key."""

import pytest

from eomt_jax import config_lib, train
from tests.tiny import runlocal_config

BAD = {
    "checkpoint_every_steps": (0, "config.checkpoint_every_steps must be an integer >= 1, got 0"),
    "log_every_steps": (0, "config.log_every_steps must be an integer >= 1, got 0"),
    "eval_every_steps": (-5, "config.eval_every_steps must be an integer >= 1"),
    "keep_checkpoints": (0, "config.keep_checkpoints must be an integer >= 1"),
    "task": ("panoptik", "config.task must be one of ('panoptic', 'instance', 'semantic'), got 'panoptik'"),
    "remat": ("blocks", "config.remat must be one of"),
    "mesh": ((("dat", -1),), "config.mesh axis 'dat' is not one of ('data', 'fsdp')"),
    "data.scale_range": ((0.5,), "config.data.scale_range must be two numbers 0 < low <= high, got (0.5,)"),
    "data.batch_size": (0, "config.data.batch_size must be an integer >= 1"),
    "data.name": ("coco", "config.data.name must be one of"),
    "model.dtype": ("fp16", "config.model.dtype must be 'auto' or one of"),
    "eval.mask_thresh": (1.5, "config.eval.mask_thresh must be a number in [0, 1]"),
    "loss.matcher": ("hungarian", "config.loss.matcher must be 'scipy' or 'optax'"),
    "anneal.ends": ((2, 3), "config.anneal: annealing starts (0,) and ends (2, 3) must be"),
}


def _set(config, path, value):
    *sections, key = path.split(".")
    node = config
    for s in sections:
        node = node[s]
    with node.unlocked():
        node[key] = value


@pytest.mark.parametrize("path", sorted(BAD))
def test_each_bad_value_is_named(path):
    config = runlocal_config()
    config_lib.validate(config)
    value, message = BAD[path]
    _set(config, path, value)
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    assert message in str(e.value)
    assert str(e.value).count("\n") == 1  # exactly this one problem


def test_every_problem_is_reported_at_once_and_nothing_is_created(tmp_path):
    config = runlocal_config()
    _set(config, "log_every_steps", 0)
    _set(config, "mesh", (("dat", -1),))
    with pytest.raises(config_lib.ConfigError, match="(?s)log_every_steps.*'dat'"):
        train.run(config, tmp_path / "w", "train")
    assert not (tmp_path / "w").exists()


def test_missing_and_unknown_keys_are_named():
    config = runlocal_config()
    with config.unlocked():
        del config["keep_checkpoints"]
        config.eval.taks = "panoptic"
    with pytest.raises(config_lib.ConfigError) as e:
        config_lib.validate(config)
    text = str(e.value)
    assert "config.keep_checkpoints is missing" in text
    assert "config.eval.taks is not a config key" in text


def test_every_zoo_config_and_variant_is_valid():
    for path in sorted(config_lib.Path(__file__).resolve().parents[1].glob("configs/*.py")):
        for arg in ("", ":runlocal"):
            config_lib.validate(config_lib.load_config_file(f"{path}{arg}"))
