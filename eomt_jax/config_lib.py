"""Building blocks of the configuration files in `configs/`.

A configuration is an `ml_collections.ConfigDict`. Every file in `configs/` calls `experiment(arg, ...)` with the
numbers of one published setting (the original's `configs/` YAML files), so the files stay short and the
structure, the argument parsing and the smoke-run variant are defined once, here. Top-level keys that scripts and
documentation rely on:

  task, total_steps, log_every_steps, eval_every_steps, checkpoint_every_steps, max_steps_per_run, seed,
  init_from, load_class_head, grad_accum_steps, remat, and the sections data, model, anneal, loss, optim, mesh,
  sharding, eval, log.

`arg` strings follow big_vision's convention: `file.py:res=1280,runlocal` -> {"res": "1280", "runlocal": True}.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import ml_collections

from eomt_jax import mesh as mesh_lib
from eomt_jax import optim
from eomt_jax.data.pipeline import DATASET_DEFAULTS
from eomt_jax.models.eomt import PRECISIONS, EoMTConfig, preset

# Training images the original keeps per dataset: its datasets skip images without annotations (COCO instance:
# 118,287 - 1,021). COCO panoptic's count is not published; its annealing milestones (multiples of 7,391) pin its
# steps per epoch instead.
TRAIN_IMAGES = {"coco_instance": 117_266, "ade20k_panoptic": 20_210, "ade20k_semantic": 20_210,
                "cityscapes_semantic": 2_975}


def original_steps_per_epoch(num_images: int, devices: int = 4, per_device: int = 4) -> int:
    """Optimizer steps per epoch of the original's runs (4 GPUs x 4 images): the distributed sampler pads the
    images to a multiple of the device count, each device then drops its last incomplete batch."""
    return -(-num_images // devices) // per_device


STEPS_PER_EPOCH = {
    "coco_panoptic": 7391,
    **{name: original_steps_per_epoch(n) for name, n in TRAIN_IMAGES.items()},
}


# The policy of `model.dtype="auto"` on GPUs and TPUs: the original's autocast arithmetic (see the README's precision
# section for the measurements behind the choice).
ACCELERATOR_PRECISION = "mixed_bfloat16"


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """'res=1280,runlocal' -> ConfigDict(res=1280, runlocal=True), typed like `defaults`; unknown keys fail."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; expected one of {sorted(defaults)}")
        default = defaults[key]
        if not sep:
            out[key] = True
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            out[key] = int(value)
        else:
            out[key] = value
    return ml_collections.ConfigDict(out)


def experiment(
    arg: str | None,
    *,
    task: str,
    dataset: str,
    size: str,
    resolutions: tuple[int, ...],
    num_classes: int,
    num_queries: int,
    epochs: int | None = None,
    anneal_starts: tuple[int, ...] | None = None,
    anneal_ends: tuple[int, ...] | None = None,
    schedules: dict[str, dict] | None = None,
    eval_every_epochs: int = 1,
) -> ml_collections.ConfigDict:
    """The config of one published setting, from a config file's `:arg` string.

    `arg` takes `res=N` (one of `resolutions`, the first by default), `runlocal` (shrink to a 2-step smoke run on
    generated data, see `runlocal`) and, when `schedules` maps schedule names to their `epochs`, `anneal_starts`
    and `anneal_ends`, `sched=NAME` (the first by default) instead of giving those three directly.
    """
    defaults = dict(res=resolutions[0], runlocal=False)
    if schedules:
        defaults["sched"] = next(iter(schedules))
    a = parse_arg(arg, **defaults)
    if a.res not in resolutions:
        raise ValueError(f"res must be one of {tuple(resolutions)}, got {a.res}")
    if schedules:
        if a.sched not in schedules:
            raise ValueError(f"sched must be one of {tuple(schedules)}, got {a.sched}")
        epochs, anneal_starts, anneal_ends = (schedules[a.sched][k] for k in ("epochs", "anneal_starts", "anneal_ends"))
    c = _experiment(task=task, dataset=dataset, size=size, image_size=a.res, num_classes=num_classes,
                    num_queries=num_queries, epochs=epochs, anneal_starts=anneal_starts, anneal_ends=anneal_ends,
                    eval_every_epochs=eval_every_epochs)
    return runlocal(c, dataset) if a.runlocal else c


def _experiment(
    *,
    task: str,
    dataset: str,
    size: str,
    image_size: int,
    num_classes: int,
    num_queries: int,
    epochs: int,
    anneal_starts: tuple[int, ...],
    anneal_ends: tuple[int, ...],
    eval_every_epochs: int = 1,
) -> ml_collections.ConfigDict:
    steps_per_epoch = STEPS_PER_EPOCH[dataset]
    augment = DATASET_DEFAULTS[dataset]
    c = ml_collections.ConfigDict()
    c.task = task  # panoptic | instance | semantic
    c.total_steps = epochs * steps_per_epoch
    c.log_every_steps = 50
    c.eval_every_steps = eval_every_epochs * steps_per_epoch
    c.checkpoint_every_steps = 2000
    c.keep_checkpoints = 3  # the newest checkpoints kept in <workdir>/checkpoints
    c.max_steps_per_run = 0  # 0 = no limit; >0 stops (with a checkpoint) after that many steps of this process
    c.seed = 0
    # Memory levers (same training arithmetic): microbatches per optimizer update (the global batch is
    # data.batch_size), and per-block rematerialisation: "none", "block" (recompute everything) or
    # "block_save_dots" (keep the matmul outputs, recompute attention, norms and GELU).
    c.grad_accum_steps = 1
    # At 1280 the step does not fit any accelerator in the README's memory table without per-block remat (the
    # attention maps of ~6600 tokens: 40 GB per image for EoMT-L), so those variants default to it.
    c.remat = "block" if image_size >= 1280 else "none"
    c.init_from = ""  # converted EoMT checkpoint or DINOv2 backbone (convert/torch_to_flax.py)
    c.load_class_head = True  # False to fine-tune on a dataset with other classes

    c.data = ml_collections.ConfigDict()
    c.data.name = dataset  # eomt_jax.data.load_source name
    c.data.root = ""  # folder with the official zips
    c.data.image_size = image_size
    c.data.batch_size = 16  # global, as in the paper (e.g. 4 devices x 4)
    c.data.max_instances = 100 if task != "semantic" else num_classes
    c.data.scale_range = augment["scale_range"]
    c.data.color_jitter = augment["color_jitter"]
    c.data.num_workers = 4
    c.data.generate = ""  # "": real data; else a synthetic kind generated into root when missing
    c.data.generate_kwargs = {}  # e.g. num_train, num_val, size for the generator

    model = preset(size, num_classes=num_classes, num_queries=num_queries, image_size=image_size).to_dict()
    model["image_size"] = tuple(model["image_size"])
    c.model = ml_collections.ConfigDict(model)
    # Precision policy (PRECISIONS): auto = ACCELERATOR_PRECISION on GPU/TPU, float32 on CPU; parameters and
    # optimizer state stay float32 whatever the policy.
    c.model.dtype = "auto"

    c.anneal = ml_collections.ConfigDict()
    c.anneal.starts = tuple(anneal_starts)
    c.anneal.ends = tuple(anneal_ends)
    c.anneal.power = 0.9

    c.loss = ml_collections.ConfigDict()
    c.loss.num_points = 12544
    c.loss.oversample_ratio = 3.0
    c.loss.importance_sample_ratio = 0.75
    c.loss.no_object_coefficient = 0.1
    c.loss.mask_coefficient = 5.0
    c.loss.dice_coefficient = 5.0
    c.loss.class_coefficient = 2.0
    c.loss.matcher = "scipy"  # scipy (host, per device shard) | optax (on device)

    c.optim = optim.default_config()

    c.mesh = (("data", -1), ("fsdp", 1))  # (axis, size) pairs; -1 = the remaining devices
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = mesh_lib.SHARDING_RULES  # (regex over state paths, "fsdp" | "replicate"); first match wins
    c.sharding.min_size = 2**18  # leaves smaller than this stay replicated

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 8
    c.eval.masked_attn = False  # published evaluations run without masks
    c.eval.mask_thresh = 0.8
    c.eval.overlap_thresh = 0.8
    c.eval.top_k_instances = 100
    c.eval.max_images = 0  # 0 = the whole split
    c.eval.save_predictions = False

    c.log = ml_collections.ConfigDict()
    c.log.tensorboard = True
    c.log.wandb = False
    c.log.wandb_project = "eomt_jax"
    return c


# The generated dataset (eomt_jax.data.synthetic kind) that stands in for each real one in smoke runs.
SYNTHETIC_KIND = {
    "coco_panoptic": "coco_panoptic",
    "coco_instance": "coco_instance",
    "ade20k_panoptic": "ade20k",
    "ade20k_semantic": "ade20k",
    "cityscapes_semantic": "cityscapes",
}


def runlocal(c: ml_collections.ConfigDict, dataset: str) -> ml_collections.ConfigDict:
    """Shrink a configuration to a smoke run on generated data: tiny model, 64 px, 2 steps."""
    synthetic_kind = SYNTHETIC_KIND[dataset]
    c.total_steps = 2
    c.log_every_steps = 1
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 2
    c.data.root = ""  # resolved to <workdir>/data by the trainer
    c.data.generate = synthetic_kind
    c.data.image_size = 64
    c.data.batch_size = 8
    c.data.max_instances = 8
    c.data.num_workers = 0
    tiny = preset("S", num_classes=c.model.num_classes, num_queries=8, image_size=64).to_dict()
    tiny.update(embed_dim=64, depth=2, num_heads=2, mlp_hidden=128, num_blocks=1, image_size=(64, 64))
    c.model = ml_collections.ConfigDict(dict(tiny, dtype="float32"))
    c.anneal.starts = (0,)
    c.anneal.ends = (2,)
    c.loss.num_points = 256
    c.optim.warmup_steps = (1, 1)
    c.eval.batch_size = 4
    c.eval.max_images = 4
    c.log.tensorboard = False
    return c


def model_config(config, platform: str | None = None) -> EoMTConfig:
    """The network architecture from a config's `model` section.

    `model.dtype` is a precision policy (`eomt_jax.models.eomt.PRECISIONS`: float32, bfloat16, mixed_bfloat16) or
    "auto": float32 on CPUs, `ACCELERATOR_PRECISION` on GPUs and TPUs; `platform` ("cpu", "gpu", "tpu"; default:
    JAX's default backend) resolves "auto".
    """
    d = config.model.to_dict() if hasattr(config.model, "to_dict") else dict(config.model)
    d["image_size"] = tuple(d["image_size"])
    precision = d.pop("dtype", "float32")
    if precision == "auto":
        precision = "float32" if (platform or jax.default_backend()) == "cpu" else ACCELERATOR_PRECISION
    if precision not in PRECISIONS:
        raise ValueError(f"config.model.dtype must be 'auto' or one of {sorted(PRECISIONS)}, got {precision!r}")
    if d.pop("matmul_dtype", None) is not None:
        raise ValueError("config.model.matmul_dtype is set by the precision policy: use config.model.dtype "
                         f"(one of {sorted(PRECISIONS)} or 'auto') instead")
    return EoMTConfig.from_dict(d).with_precision(precision)


def prepare_workdir(config: ml_collections.ConfigDict, workdir) -> Path:
    """Create the run's workdir (absolute) and record the config in `config.json` (process 0)."""
    workdir = Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    return workdir


def load_config_file(spec: str):
    """`path/to/config.py[:arg]` -> the ConfigDict returned by its `get_config(arg)`."""
    file, _, arg = spec.partition(":")
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    module_spec = importlib.util.spec_from_file_location(f"_eomt_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()
