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


def test_auto_precision_is_float32_on_cpu_and_mixed_bfloat16_on_accelerators(monkeypatch):
    config = load_config_file(str(REPO / "configs" / "coco_panoptic_large.py"))
    assert config.model.dtype == "auto"
    assert config_lib.model_config(config).dtype == "float32"  # the tests run on CPU
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    cfg = config_lib.model_config(config)
    # Accelerators: the original's autocast arithmetic, float32 master weights.
    assert (cfg.precision, cfg.dtype, cfg.matmul_dtype, cfg.param_dtype) == (
        "mixed_bfloat16", "float32", "bfloat16", "float32")
    assert config_lib.model_config(config, platform="tpu").precision == "mixed_bfloat16"  # a --target_topology compile
    assert config_lib.model_config(config, platform="cpu").precision == "float32"
    config.model.dtype = "bfloat16"  # the all-bf16 policy stays selectable
    assert (config_lib.model_config(config).dtype, config_lib.model_config(config).matmul_dtype) == ("bfloat16", None)
    config.model.dtype = "float16"
    with pytest.raises(ValueError, match="config.model.dtype"):
        config_lib.model_config(config)
    config.model.dtype = "float32"
    config.model.matmul_dtype = "bfloat16"  # not a knob of its own: the policy sets it, nothing is ignored
    with pytest.raises(ValueError, match="matmul_dtype is set by the precision policy"):
        config_lib.model_config(config)


@pytest.mark.parametrize("name", ["coco_panoptic_large", "coco_panoptic_giant", "coco_instance_large"])
def test_1280_variants_default_to_block_remat(name):
    """Without it no accelerator of the README's memory table holds a 1280 step; 640 keeps the faster default."""
    path = str(REPO / "configs" / f"{name}.py")
    assert load_config_file(path + ":res=1280").remat == "block"
    assert load_config_file(path).remat == "none"


# (config[:arg], the original's epochs, its optimizer steps per epoch on 4 GPUs x 4 images): COCO panoptic's from
# its annealing milestones (epochs 2, 4, ... are multiples of 7,391), the others from their training images
# (COCO instance without its 1,021 unannotated images) padded by the distributed sampler to a multiple of 4, each
# GPU dropping its last incomplete batch of 4.
SCHEDULES = [
    ("coco_panoptic_small", 24, 7391), ("coco_panoptic_small:sched=1x", 12, 7391),
    ("coco_panoptic_base", 24, 7391), ("coco_panoptic_large", 12, 7391), ("coco_panoptic_large:res=1280", 12, 7391),
    ("coco_panoptic_giant", 12, 7391),
    ("coco_instance_large", 12, 29317 // 4),  # ceil(117,266 / 4) = 29,317 images per GPU -> 7,329
    ("ade20k_panoptic_large", 31, 5053 // 4), ("ade20k_panoptic_giant", 31, 5053 // 4),  # 20,210 images
    ("ade20k_semantic_large", 31, 5053 // 4),
    ("cityscapes_semantic_large", 107, 744 // 4),  # 2,975 images, padded to 2,976: 186, not 2,975 // 16 = 185
]


@pytest.mark.parametrize("spec,epochs,steps_per_epoch", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_total_steps_follow_the_original_steps_per_epoch(spec, epochs, steps_per_epoch):
    name, _, arg = spec.partition(":")
    config = load_config_file(str(REPO / "configs" / f"{name}.py") + (f":{arg}" if arg else ""))
    assert config.total_steps == epochs * steps_per_epoch
    every = 2 if name == "coco_instance_large" else 1  # COCO instance validates every 2 epochs
    assert config.eval_every_steps == every * steps_per_epoch
    assert config_lib.original_steps_per_epoch(117_266) == 7329 and config_lib.original_steps_per_epoch(2_975) == 186
