"""The config files: every one parses, validates, and builds its data pipeline, model and train step (traced,
not compiled: the runs of test_train.py compile and execute the step); zoo-wide defaults."""

from __future__ import annotations

import glob
from pathlib import Path

import jax
import pytest

from eomt_jax import config_lib, train_step
from eomt_jax import data as data_lib
from eomt_jax.config_lib import load_config_file
from eomt_jax.mesh import make_mesh

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(glob.glob(str(REPO / "configs" / "*.py")))


@pytest.fixture(scope="module")
def generated_roots(tmp_path_factory):
    """One generated dataset per kind, shared by the configs that use it."""
    roots = {}

    def root(config):
        kind = config.data.generate
        if kind not in roots:
            roots[kind] = data_lib.dataset_root(config.data, tmp_path_factory.mktemp(kind))
        return roots[kind]

    return root


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: Path(p).stem)
def test_every_config_builds_its_pipeline_model_and_step(path, generated_roots):
    config = load_config_file(path + ":runlocal")
    assert config.model.num_queries >= config.data.max_instances
    cfg = config_lib.model_config(config)
    source = data_lib.load_source(config.data.name, generated_roots(config), "train")
    assert source.num_classes == cfg.num_classes
    stream = data_lib.TrainIterator(
        data_lib.train_dataset(source, data_lib.TrainSettings.from_config(config.data, config.seed)), None)
    batch = next(stream)
    setup = train_step.setup(config, cfg, make_mesh(config.mesh))
    expected = setup.abstract_batch()
    assert {k: (v.shape, v.dtype) for k, v in batch.items() if k in expected} == \
        {k: (v.shape, v.dtype) for k, v in expected.items()}
    state, metrics = jax.eval_shape(setup.jit_step(), setup.abstract_state, expected)
    assert metrics["train/loss"].shape == () and state["step"].shape == ()
    assert jax.tree.structure(state) == jax.tree.structure(setup.abstract_state)


def test_auto_compute_dtype_is_float32_on_cpu_and_bfloat16_on_accelerators(monkeypatch):
    config = load_config_file(str(REPO / "configs" / "coco_panoptic_large.py"))
    assert config.model.dtype == "auto"
    assert config_lib.model_config(config).dtype == "float32"  # the tests run on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    cfg = config_lib.model_config(config)
    assert (cfg.dtype, cfg.param_dtype) == ("bfloat16", "float32")
    assert config_lib.model_config(config, platform="tpu").dtype == "bfloat16"  # a --target_topology compile
    assert config_lib.model_config(config, platform="cpu").dtype == "float32"


@pytest.mark.parametrize("name", ["coco_panoptic_large", "coco_panoptic_giant", "coco_instance_large"])
def test_1280_variants_default_to_block_remat(name):
    """Without it no accelerator of the README's memory table holds a 1280 step; 640 keeps the faster default."""
    path = str(REPO / "configs" / f"{name}.py")
    assert load_config_file(path + ":res=1280").remat == "block"
    assert load_config_file(path).remat == "none"
