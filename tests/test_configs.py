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


@pytest.mark.parametrize("name", ["coco_panoptic_large", "coco_panoptic_giant", "coco_instance_large",
                                  "dinov3_coco_panoptic_large", "dinov3_coco_instance_large"])
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
    # DINOv3: the same datasets, so the same steps per epoch; ADE20K semantic trains 16 epochs, not 31.
    ("dinov3_coco_panoptic_small", 24, 7391), ("dinov3_coco_panoptic_base", 24, 7391),
    ("dinov3_coco_panoptic_large", 12, 7391), ("dinov3_coco_panoptic_large:res=1280", 12, 7391),
    ("dinov3_coco_instance_large", 12, 29317 // 4), ("dinov3_coco_instance_large:res=1280", 12, 29317 // 4),
    ("dinov3_ade20k_semantic_large", 16, 5053 // 4),
]


@pytest.mark.parametrize("spec,epochs,steps_per_epoch", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_total_steps_follow_the_original_steps_per_epoch(spec, epochs, steps_per_epoch):
    name, _, arg = spec.partition(":")
    config = load_config_file(str(REPO / "configs" / f"{name}.py") + (f":{arg}" if arg else ""))
    assert config.total_steps == epochs * steps_per_epoch
    every = 2 if name.endswith("coco_instance_large") else 1  # COCO instance validates every 2 epochs
    assert config.eval_every_steps == every * steps_per_epoch
    assert config_lib.original_steps_per_epoch(117_266) == 7329 and config_lib.original_steps_per_epoch(2_975) == 186


# The DINOv3 settings as the original's `configs/dinov3/**` YAML files write them (lr 2e-4 and warm-up (2000, 3000)
# in all): (config[:arg], size, image size, queries, classes, llrd, llrd_l2_enabled, lr_mult, anneal starts, ends).
DINOV3 = [
    ("dinov3_coco_panoptic_small", "S", 640, 200, 133, 0.8, False, 1.0, (0, 73910, 118256), (3000, 103474, 147820)),
    ("dinov3_coco_panoptic_base", "B", 640, 200, 133, 0.8, False, 1.0, (0, 73910, 118256), (3000, 103474, 147820)),
    ("dinov3_coco_panoptic_large", "L", 640, 200, 133, 0.8, False, 1.0,
     (0, 29564, 44346, 59128), (3000, 44346, 59128, 73910)),
    ("dinov3_coco_panoptic_large:res=1280", "L", 1280, 200, 133, 0.8, False, 1.0,
     (0, 29564, 44346, 59128), (3000, 44346, 59128, 73910)),
    ("dinov3_coco_instance_large", "L", 640, 200, 80, 0.8, False, 1.0,
     (14782, 29564, 44346, 59128), (29564, 44346, 59128, 73910)),
    ("dinov3_coco_instance_large:res=1280", "L", 1280, 200, 80, 0.8, False, 1.0,
     (14782, 29564, 44346, 59128), (29564, 44346, 59128, 73910)),
    ("dinov3_ade20k_semantic_large", "L", 512, 100, 150, 1.0, True, 0.1,
     (0, 6520, 9780, 13040), (3000, 9780, 13040, 16300)),
]
# (width, depth, K) of the DINOv3 sizes the zoo uses (facebookresearch/dinov3 `hub/backbones.py`).
DINOV3_SIZES = {"S": (384, 12, 3), "B": (768, 12, 3), "L": (1024, 24, 4)}


@pytest.mark.parametrize("spec,size,image_size,queries,classes,llrd,l2,lr_mult,starts,ends", DINOV3,
                         ids=[s[0] for s in DINOV3])
def test_dinov3_configs_follow_the_original_recipe(spec, size, image_size, queries, classes, llrd, l2, lr_mult,
                                                   starts, ends):
    name, _, arg = spec.partition(":")
    config = load_config_file(str(REPO / "configs" / f"{name}.py") + (f":{arg}" if arg else ""))
    config_lib.validate(config)
    m = config.model
    assert (m.backbone, m.layer_norm_eps, m.patch_size, m.num_registers, m.rope_theta) == ("dinov3", 1e-5, 16, 4, 100.0)
    assert (m.embed_dim, m.depth, m.num_blocks) == DINOV3_SIZES[size] and m.num_heads == m.embed_dim // 64
    assert tuple(m.image_size) == (image_size, image_size) == (config.data.image_size,) * 2
    assert (m.num_queries, m.num_classes) == (queries, classes)
    o = config.optim
    assert (o.lr, tuple(o.warmup_steps), o.llrd, o.llrd_l2_enabled, o.lr_mult) == (2e-4, (2000, 3000), llrd, l2, lr_mult)
    assert (o.weight_decay, o.poly_power, o.clip_norm, config.data.batch_size) == (0.05, 0.9, 0.01, 16)
    assert tuple(config.anneal.starts) == starts and tuple(config.anneal.ends) == ends
    assert config.eval.masked_attn is False  # published evaluations run without masks

    tiny = load_config_file(str(REPO / "configs" / f"{name}.py:runlocal"))
    cfg = config_lib.model_config(tiny)  # the smoke run keeps the DINOv3 backbone, shrunk
    assert (cfg.backbone, cfg.layer_norm_eps, cfg.embed_dim, cfg.depth) == ("dinov3", 1e-5, 64, 2)
    assert (cfg.embed_dim // cfg.num_heads) % 4 == 0 and (tiny.optim.lr, tiny.optim.llrd) == (2e-4, llrd)


def test_a_setting_cannot_change_an_unknown_optimizer_value():
    with pytest.raises(ValueError, match=r"\['learning_rate'\] are not keys of config.optim"):
        config_lib.experiment(None, task="panoptic", dataset="coco_panoptic", size="S", resolutions=(640,),
                              num_classes=133, num_queries=200, epochs=1, anneal_starts=(0,) * 3,
                              anneal_ends=(1,) * 3, optimizer=dict(learning_rate=1e-3))
