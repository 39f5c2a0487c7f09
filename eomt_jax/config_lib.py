"""Building blocks of the configuration files in `configs/`.

A configuration is an `ml_collections.ConfigDict`. Every file in `configs/` calls `experiment(arg, ...)` with the
numbers of one published setting (the original's `configs/` YAML files), so the files stay short and the
structure, the argument parsing and the smoke-run variant are defined once, here. Top-level keys that scripts and
documentation rely on:

  task, total_steps, epochs, log_every_steps, eval_every_steps, checkpoint_every_steps, max_steps_per_run, seed,
  init_from, load_class_head, grad_accum_steps, remat, and the sections data, model, anneal, schedule, loss, optim,
  mesh, sharding, eval, log.

What comes from the data (the classes of a user's dataset, the length of a run given in epochs) and a schedule
given relative to the run's length are filled in at start-up by `resolve`, which train, eval and compile call.

`arg` strings follow big_vision's convention: `file.py:res=1280,runlocal` -> {"res": "1280", "runlocal": True}.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import jax
import ml_collections

from eomt_jax import annealing, optim
from eomt_jax import mesh as mesh_lib
from eomt_jax.data.pipeline import DATASET_DEFAULTS
from eomt_jax.models.eomt import PRECISIONS, EoMTConfig, preset

log = logging.getLogger("eomt_jax")

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
    # The run's length: total_steps, or epochs (passes over the training split: len(split) // data.batch_size steps
    # each, counted at start-up); give one of them, the other 0.
    c.total_steps = epochs * steps_per_epoch
    c.epochs = 0
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
    # A user's dataset (data.name "coco_format" or "semantic_folder"; see eomt_jax/data/sources.py): each split's
    # files, relative to data.root or absolute: images (folder or zip), COCO JSON, masks (folder or zip: panoptic
    # PNGs, or label PNGs of a semantic folder); "" = the source's default names.
    c.data.train_images = ""
    c.data.train_json = ""
    c.data.train_masks = ""
    c.data.val_images = ""
    c.data.val_json = ""
    c.data.val_masks = ""
    c.data.val_fraction = 0.0  # > 0: no val files; this fraction of the train split (fixed, seeded) is the val split
    c.data.ignore_value = 255  # semantic_folder: the label value of unlabelled pixels
    c.data.ignore_zero = False  # semantic_folder: 0 is unlabelled too and value v is class v - 1 (ADE20K's labels)
    c.data.class_names_file = ""  # semantic_folder: one class name per line (default: numbered classes)
    # Filled in at start-up from the data (`resolve`), recorded in the workdir's config.json and with the trained
    # network (<workdir>/model), whence `predict` names the classes.
    c.data.class_names = ()
    c.data.stuff_classes = ()

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
    # A run whose annealing has not reached 0 by its last step is refused at start-up unless this is True.
    c.anneal.allow_unfinished = False

    # Steps relative to the run's length (see `resolve`). The absolute step values of this config (anneal.starts
    # and .ends, optim.warmup_steps, eval_every_steps, checkpoint_every_steps) were written for a run of
    # `reference_steps` steps: a run of another length rescales them by total_steps / reference_steps (0: never
    # rescaled). A fraction of total_steps given below replaces the absolute value instead.
    c.schedule = ml_collections.ConfigDict()
    c.schedule.reference_steps = c.total_steps
    c.schedule.anneal_starts = ()  # one fraction per masked block, with anneal_ends
    c.schedule.anneal_ends = ()
    c.schedule.warmup = ()  # (heads, backbone) fractions
    c.schedule.eval_every = 0.0
    c.schedule.checkpoint_every = 0.0

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
    2 steps. Its schedule is absolute and may stop mid-annealing (`--config.total_steps=1`): a smoke run checks the
    code, not the schedule."""
    synthetic_kind = SYNTHETIC_KIND[dataset]
    c.total_steps = 2
    c.log_every_steps = 1
    c.eval_every_steps = 2
    c.checkpoint_every_steps = 2
    c.data.root = ""  # resolved to <workdir>/data by the trainer
    c.data.generate = synthetic_kind
    tiny_model(c)
    c.anneal.starts = (0,)
    c.anneal.ends = (2,)
    c.anneal.allow_unfinished = True
    c.schedule.reference_steps = 0
    c.optim.warmup_steps = (1, 1)
    return c


def tiny_model(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The smoke-run model and sizes: a 2-block, 64-wide network of the config's backbone kind with one masked
    block, 8 queries, 64 px, batch 8, 256 loss points, 4 evaluated images; float32, no TensorBoard."""
    c.data.image_size = 64
    c.data.batch_size = 8
    c.data.max_instances = 8
    c.data.num_workers = 0
    tiny = preset("S", backbone=c.model.backbone, num_classes=c.model.num_classes, num_queries=8,
                  image_size=64).to_dict()
    tiny.update(embed_dim=64, depth=2, num_heads=2, mlp_hidden=128, num_blocks=1, image_size=(64, 64))
    c.model = ml_collections.ConfigDict(dict(tiny, dtype="float32"))
    c.loss.num_points = 256
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


# -- start-up: what comes from the data and the run's length ------------------------------------------------------

def resolve(config: ml_collections.ConfigDict, workdir, *, training: bool = True) -> ml_collections.ConfigDict:
    """A copy of `config` with what it leaves to start-up filled in, checked by `validate`:

    * from the data: `model.num_classes` when 0, `data.max_instances` when 0 (semantic: the number of classes,
      else 100), `data.class_names` (unless given, one per class) and `data.stuff_classes`. The zoo datasets'
      classes are known (`eomt_jax.data.classes`); any other source's training split is read for them;
    * the run's length: `total_steps`, or `epochs` x (training images // data.batch_size) steps;
    * the schedule in steps of this run: each fraction given in `schedule` replaces its absolute value; absolute
      values written for a run of `schedule.reference_steps` are rescaled by total_steps / reference_steps (logged);
      afterwards `schedule.reference_steps` is the run's length, so resolving again changes nothing.

    A training run whose annealing does not reach probability 0 before its last step is refused (`ConfigError`
    with the numbers) unless `anneal.allow_unfinished`. `training=False` (evaluation) fills in the classes only.
    The dataset is found (or generated) under `workdir` as by `eomt_jax.data.dataset_root`, and only when needed.
    """
    from eomt_jax import data as data_lib
    from eomt_jax.data import classes

    c = ml_collections.ConfigDict(config.to_dict())
    source = None

    def train_split():
        nonlocal source
        if source is None:
            try:
                root = data_lib.dataset_root(c.data, Path(workdir))
            except ValueError as e:
                raise ConfigError(f"{e} (this run's classes or length come from the data)") from None
            try:
                source = data_lib.source_from_config(c.data, root, "train")
            except data_lib.DataError:
                raise
            except ValueError as e:  # an option the source does not take
                raise ConfigError(str(e)) from None
        return source

    # -- classes
    try:
        names, stuff = classes.dataset_classes(c.data.name)
    except ValueError:  # not a zoo dataset: its training split tells
        names, stuff = list(train_split().class_names), list(train_split().stuff_classes)
    if c.task == "semantic":
        stuff = list(range(len(names)))
    where = f"the {c.data.name} training split" + (f" in {c.data.root}" if c.data.root else "")
    if c.model.num_classes == 0:
        c.model.num_classes = len(names)
        log.info("%d classes from %s: %s", len(names), where, ", ".join(names[:20]) + (" ..." if len(names) > 20
                                                                                         else ""))
    elif c.model.num_classes != len(names):
        raise ConfigError(f"config.model.num_classes is {c.model.num_classes} but {where} has {len(names)} classes "
                          "(0 takes the data's)")
    if c.data.class_names and len(c.data.class_names) != len(names):
        raise ConfigError(f"config.data.class_names holds {len(c.data.class_names)} names for the {len(names)} "
                          f"classes of {where}")
    c.data.class_names = tuple(c.data.class_names or names)
    c.data.stuff_classes = tuple(int(k) for k in (c.data.stuff_classes or stuff))
    if c.data.max_instances == 0:
        c.data.max_instances = c.model.num_classes if c.task == "semantic" else 100
    if not training:
        validate(c)
        return c

    # -- length
    if c.total_steps and c.epochs:
        validate(c)  # names the conflict
    if not c.total_steps:
        images = len(train_split())
        per_epoch = images // c.data.batch_size
        if per_epoch == 0:
            raise ConfigError(f"{where} has {images} images, fewer than one batch (data.batch_size "
                              f"{c.data.batch_size})")
        if not c.epochs:
            raise ConfigError(f"config.total_steps and config.epochs are both 0: give the run's length, e.g. "
                              f"--config.epochs=E or --config.total_steps=N ({where} has {images} images: "
                              f"{per_epoch} steps per epoch at data.batch_size {c.data.batch_size})")
        c.total_steps = c.epochs * per_epoch
        log.info("total_steps %d = %d epochs x %d steps (%d training images // batch %d)", c.total_steps, c.epochs,
                 per_epoch, images, c.data.batch_size)
        c.epochs = 0  # the length is total_steps from here on
    total = c.total_steps

    # -- schedule
    sched = c.schedule
    reference = sched.reference_steps
    if reference and reference != total:
        def scaled(v):
            return annealing.to_step(v / reference, total)

        c.anneal.starts, c.anneal.ends = annealing.steps_from_fractions(
            [v / reference for v in c.anneal.starts], [v / reference for v in c.anneal.ends], total)
        c.optim.warmup_steps = tuple(scaled(w) for w in c.optim.warmup_steps)
        c.eval_every_steps = max(1, scaled(c.eval_every_steps))
        c.checkpoint_every_steps = max(1, scaled(c.checkpoint_every_steps))
        log.info("total_steps %d instead of the %d this config's schedule was written for: annealing milestones, "
                 "warm-up, evaluation and checkpoint intervals rescaled by %.4g", total, reference, total / reference)
    if sched.anneal_starts or sched.anneal_ends:
        c.anneal.starts, c.anneal.ends = annealing.steps_from_fractions(sched.anneal_starts, sched.anneal_ends, total)
    if sched.warmup:
        c.optim.warmup_steps = tuple(annealing.to_step(w, total) for w in sched.warmup)
    if sched.eval_every:
        c.eval_every_steps = max(1, annealing.to_step(sched.eval_every, total))
    if sched.checkpoint_every:
        c.checkpoint_every_steps = max(1, annealing.to_step(sched.checkpoint_every, total))
    sched.reference_steps = total
    log.info("schedule of %d steps: masked attention annealed from steps %s to %s, warm-up %s, evaluation every %d, "
             "checkpoint every %d steps", total, tuple(c.anneal.starts), tuple(c.anneal.ends),
             tuple(c.optim.warmup_steps), c.eval_every_steps, c.checkpoint_every_steps)
    late = annealing.unfinished_blocks(c.anneal.ends, total)
    if late and not c.anneal.allow_unfinished:
        given = ("config.schedule.anneal_ends " + str(tuple(sched.anneal_ends)) if sched.anneal_ends else
                 "config.anneal.ends" + (f" {tuple(config.anneal.ends)} rescaled to this length" if reference
                                         and reference != total else ""))
        raise ConfigError(
            f"config.anneal: masked attention would still be on at the last step of this {total}-step run: block(s) "
            f"{late} anneal until step(s) {[c.anneal.ends[j] for j in late]} (from {given}), after the last step "
            f"{total - 1}. The trained network is evaluated without masks, so the annealing must end before: end it "
            "earlier (config.schedule.anneal_starts / anneal_ends as fractions of the run, or config.anneal.starts / "
            "ends), train longer, or set --config.anneal.allow_unfinished=True if this is intended")
    validate(c)
    return c


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

    for path in ("log_every_steps", "eval_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                 "grad_accum_steps", "data.image_size", "data.batch_size", "eval.batch_size"):
        positive(path)
    # total_steps / epochs 0 and data.max_instances 0 are filled in at start-up (`resolve`).
    for path in ("total_steps", "epochs", "schedule.reference_steps", "max_steps_per_run", "data.num_workers",
                 "data.max_instances", "eval.max_images", "data.ignore_value"):
        positive(path, minimum=0)
    total, epochs = get("total_steps"), get("epochs")
    check(not (isinstance(total, int) and isinstance(epochs, int) and total > 0 and epochs > 0),
          f"config.total_steps ({total}) and config.epochs ({epochs}) both give the run's length; set the other to 0 "
          f"(e.g. --config.total_steps=0 --config.epochs={epochs})")
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
    for path in ("eval.mask_thresh", "eval.overlap_thresh", "data.max_unreadable_fraction", "schedule.eval_every",
                 "schedule.checkpoint_every"):
        v = get(path)
        check(isinstance(v, (int, float)) and 0 <= v <= 1, f"config.{path} must be a number in [0, 1], got {v!r}")
    v = get("data.val_fraction")
    check(isinstance(v, (int, float)) and 0 <= v < 1, f"config.data.val_fraction must be a number in [0, 1), got {v!r}")
    warmup = get("schedule.warmup")
    check(warmup is None or (isinstance(warmup, (tuple, list)) and len(warmup) in (0, 2) and all(
        isinstance(w, (int, float)) and 0 <= w <= 1 for w in warmup)),
        f"config.schedule.warmup must be () or two fractions (heads, backbone) in [0, 1], got {warmup!r}")
    mesh = get("mesh")
    try:
        axes = [(str(name), int(size)) for name, size in mesh]
    except (TypeError, ValueError):
        problems.append(f"config.mesh must be (axis name, size) pairs, e.g. (('data', -1), ('fsdp', 1)); got {mesh!r}")
    else:
        for name, size in axes:
            check(name in MESH_AXES, f"config.mesh axis {name!r} is not one of {MESH_AXES}")
            check(size == -1 or size >= 1, f"config.mesh axis {name!r} has size {size}; expected -1 or >= 1")
    k = get("model.num_blocks")
    fractions = get("schedule.anneal_starts"), get("schedule.anneal_ends")
    if fractions[0] or fractions[1]:  # they replace anneal.starts / anneal.ends
        try:
            starts, ends = (tuple(float(f) for f in x) for x in fractions)
            check(len(starts) == len(ends) == k and all(0 <= a < b <= 1 for a, b in zip(starts, ends)),
                  f"config.schedule.anneal_starts {starts} and anneal_ends {ends} must be one fraction each per "
                  f"masked block (model.num_blocks={k}), with 0 <= start < end <= 1")
        except (TypeError, ValueError):
            problems.append(f"config.schedule.anneal_starts / anneal_ends must be tuples of numbers, got {fractions}")
    else:
        starts, ends = get("anneal.starts"), get("anneal.ends")
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
