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

from eomt_jax import annealing, optim
from eomt_jax import mesh as mesh_lib
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
    backbone: str = "dinov2",
    optimizer: dict | None = None,
) -> ml_collections.ConfigDict:
    """The config of one published setting, from a config file's `:arg` string.

    `arg` takes `res=N` (one of `resolutions`, the first by default), `runlocal` (shrink to a 2-step smoke run on
    generated data, see `runlocal`) and, when `schedules` maps schedule names to their `epochs`, `anneal_starts`
    and `anneal_ends`, `sched=NAME` (the first by default) instead of giving those three directly.

    `backbone` ("dinov2" or "dinov3") and `size` pick the architecture (`eomt_jax.models.eomt.preset`);
    `optimizer` holds the values of `config.optim` that the setting changes from `optim.default_config()` (e.g.
    `lr`, `warmup_steps`, `llrd_l2_enabled`); a key that is not an optimizer setting is an error.
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
                    eval_every_epochs=eval_every_epochs, backbone=backbone, optimizer=optimizer)
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
    backbone: str = "dinov2",
    optimizer: dict | None = None,
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
    c.init_from = ""  # converted EoMT checkpoint or DINOv2/DINOv3 backbone (convert/torch_to_flax.py)
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
    c.data.max_unreadable_fraction = 0.01  # damaged training images are skipped (and named) up to this fraction
    c.data.generate = ""  # "": real data; else a synthetic kind generated into root when missing
    c.data.generate_kwargs = {}  # e.g. num_train, num_val, size for the generator

    model = preset(size, backbone=backbone, num_classes=num_classes, num_queries=num_queries,
                   image_size=image_size).to_dict()
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
    unknown = sorted(set(optimizer or {}) - set(c.optim.keys()))
    if unknown:
        raise ValueError(f"optimizer settings {unknown} are not keys of config.optim; expected some of "
                         f"{sorted(c.optim.keys())}")
    c.optim.update(optimizer or {})

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
    """Shrink a configuration to a smoke run on generated data: tiny model of the same backbone kind, 64 px,
    2 steps."""
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
    tiny = preset("S", backbone=c.model.backbone, num_classes=c.model.num_classes, num_queries=8,
                  image_size=64).to_dict()
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
    """Check the config (`validate`), create the run's workdir (absolute) and record the config in `config.json`
    (process 0)."""
    validate(config)
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


# -- validation ---------------------------------------------------------------------------------------------------

class ConfigError(ValueError):
    """A config that cannot run; the message lists every problem."""


TASKS = ("panoptic", "instance", "semantic")
MESH_AXES = ("data", "fsdp")  # the names the sharding rules and the batch sharding use


def validate(config: ml_collections.ConfigDict) -> None:
    """Check a config before anything is built or compiled; raise one ConfigError listing every problem.

    Checks that the config has exactly the keys of the zoo configs (`_experiment`: a key the code reads is never
    missing, a misspelt one in a config file is never ignored), that intervals and sizes are positive, that
    enumerations hold one of their values, and that tuples have their length.
    """
    from eomt_jax.data.registry import SOURCES
    from eomt_jax.models.eomt import REMAT_POLICIES

    problems = _schema_problems(config.to_dict(), _reference().to_dict(), "config")

    def check(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    def get(path: str):
        node = config
        for part in path.split("."):
            if not hasattr(node, "keys") or part not in node:
                return None
            node = node[part]
        return node

    def positive(path: str, minimum: int = 1) -> None:
        v = get(path)
        if v is not None:
            check(isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
                  f"config.{path} must be an integer >= {minimum}, got {v!r}")

    for path in ("total_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                 "grad_accum_steps", "data.image_size", "data.batch_size", "data.max_instances", "eval.batch_size"):
        positive(path)
    for path in ("max_steps_per_run", "data.num_workers", "eval.max_images"):
        positive(path, minimum=0)
    check(get("task") in TASKS, f"config.task must be one of {TASKS}, got {get('task')!r}")
    check(get("remat") in REMAT_POLICIES, f"config.remat must be one of {sorted(REMAT_POLICIES)}, got {get('remat')!r}")
    dtype = get("model.dtype")
    check(dtype == "auto" or dtype in PRECISIONS,
          f"config.model.dtype must be 'auto' or one of {sorted(PRECISIONS)}, got {dtype!r}")
    check(get("data.name") in SOURCES, f"config.data.name must be one of {sorted(SOURCES)}, got {get('data.name')!r}")
    check(get("loss.matcher") in ("scipy", "optax"), f"config.loss.matcher must be 'scipy' or 'optax', got "
                                                     f"{get('loss.matcher')!r}")
    scale = get("data.scale_range")
    check(isinstance(scale, (tuple, list)) and len(scale) == 2 and all(isinstance(v, (int, float)) for v in scale)
          and 0 < scale[0] <= scale[1], f"config.data.scale_range must be two numbers 0 < low <= high, got {scale!r}")
    for path in ("eval.mask_thresh", "eval.overlap_thresh", "data.max_unreadable_fraction"):
        v = get(path)
        check(isinstance(v, (int, float)) and 0 <= v <= 1, f"config.{path} must be a number in [0, 1], got {v!r}")
    mesh = get("mesh")
    try:
        axes = [(str(name), int(size)) for name, size in mesh]
    except (TypeError, ValueError):
        problems.append(f"config.mesh must be (axis name, size) pairs, e.g. (('data', -1), ('fsdp', 1)); got {mesh!r}")
    else:
        for name, size in axes:
            check(name in MESH_AXES, f"config.mesh axis {name!r} is not one of {MESH_AXES}")
            check(size == -1 or size >= 1, f"config.mesh axis {name!r} has size {size}; expected -1 or >= 1")
    starts, ends, k = get("anneal.starts"), get("anneal.ends"), get("model.num_blocks")
    try:
        annealing.check_schedule(starts, ends)
        check(len(tuple(starts)) == k, f"config.anneal has {len(tuple(starts))} phases for model.num_blocks={k} "
                                       "masked blocks; expected one per block")
    except (TypeError, ValueError) as e:
        problems.append(f"config.anneal: {e}")
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))


def _reference() -> ml_collections.ConfigDict:
    return _experiment(task="panoptic", dataset="coco_panoptic", size="S", image_size=640, num_classes=133,
                       num_queries=200, epochs=1, anneal_starts=(0, 1, 2), anneal_ends=(1, 2, 3))


def _schema_problems(got, want, where: str) -> list[str]:
    """Missing and unknown keys of `got` against `want`, recursing into sections (dicts) only."""
    problems = []
    if where == "config.model":  # the architecture's fields are checked against EoMTConfig (`model_config`)
        return problems
    for key in sorted(set(want) - set(got)):
        problems.append(f"{where}.{key} is missing (every config has it; see eomt_jax/config_lib.py)")
    for key in sorted(set(got) - set(want)):
        problems.append(f"{where}.{key} is not a config key")
    for key in sorted(set(got) & set(want)):
        if isinstance(want[key], dict) and key not in ("generate_kwargs",):
            if isinstance(got[key], dict):
                problems += _schema_problems(got[key], want[key], f"{where}.{key}")
            else:
                problems.append(f"{where}.{key} must be a section, got {got[key]!r}")
    return problems
