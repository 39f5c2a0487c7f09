"""Your own data: panoptic or instance segmentation from COCO-format annotations, semantic from a folder of label PNGs.

    python -m eomt_jax.main --config=configs/custom.py:task=panoptic,size=L --workdir=W --mode=train_and_eval \
        --config.data.root=DATA --config.epochs=E \
        --config.init_from=checkpoints/coco_panoptic_eomt_large_640 --config.load_class_head=False

`:task=` panoptic | instance | semantic; `size=` S | B | L | g (DINOv2), or with `backbone=dinov3` S | S+ | B | L |
L+ | H+; `res=` the square training size (default 640, semantic 512); `runlocal` is a 6-step smoke run of a tiny
model on generated data in the task's layout (`RUNLOCAL_DATA`).

1. Data (`--config.data.root=DATA`, every path below relative to it or absolute; any file names):
   * panoptic / instance: `--config.data.train_json=... --config.data.train_images=...` (a folder or zip of images,
     matched to the JSON's file names by stem) and, for panoptic, `--config.data.train_masks=...` (the folder or
     zip of the segment PNGs); the same `val_*` keys for the val split. Classes, their names and which are stuff
     (`isthing: 0`) come from the JSON's `categories`. Without `train_json`, DATA holds `train.json`, `train/`
     and `panoptic_train/` (folders or zips), or the official COCO zips.
   * semantic: `--config.data.train_images=... --config.data.train_masks=...`: label PNGs paired with the images
     by file stem (default folders `images/` and `labels/`), single-channel class indices; `data.ignore_value`
     (255) marks unlabelled pixels, `--config.data.ignore_zero=True` reads ADE20K-style labels (0 unlabelled,
     value v is class v - 1); `--config.data.class_names_file=names.txt` names the classes, one per line
     (otherwise they are numbered up to the largest class in the training labels).
   * the val split: its own files (`val_*`), or `--config.data.val_fraction=0.1` for a fixed, seeded tenth of
     the training images.
   At start-up the classes are read off the data (`config_lib.resolve`): `model.num_classes`, the class names and
   the stuff classes are recorded in W/config.json and, when the run ends, with the trained network in W/model.

2. Length: `--config.epochs=E` (E x images // data.batch_size steps) or `--config.total_steps=N`; one of them.
   The schedule is a fraction of the run, so any length has the original's shape: the warm-ups, the evaluation
   and checkpoint intervals are those of the original's config for the task (`RECIPES`) divided by its length,
   and masked attention is annealed as in `annealing.original_fractions` (EoMT-L: the four blocks over 1/6-2/6,
   2/6-3/6, 3/6-4/6, 4/6-5/6 of training). Change any of it with `--config.schedule.anneal_starts=(...)`,
   `.anneal_ends`, `.warmup`, `.eval_every`, `.checkpoint_every` (fractions of the run). A schedule whose
   annealing does not end before the last step is refused at start-up.

3. Initialisation, always with a new class head for your classes (`--config.load_class_head=False`): a converted
   zoo model of the same size and backbone (`--config.init_from=CKPT`; another image size is fine, the position
   grid is resampled), or a converted DINOv2 / DINOv3 backbone (`python convert/torch_to_flax.py --src
   timm/vit_large_patch14_reg4_dinov2.lvd142m --dst B --config configs/custom.py:task=panoptic`, then
   `--config.init_from=B`), as the zoo configs' docstrings show. Without init_from the network starts from random
   weights.

4. Results: `--mode=train_and_eval` evaluates the val split during and at the end of training (PQ, mask AP or
   mIoU, with overlays naming your classes); `--mode=eval` evaluates the workdir's latest checkpoint. The trained
   network is written to W/model with the class names, so

       python -m eomt_jax.predict --checkpoint W/model --task panoptic --input photos/ --output predictions/

   names your classes in its overlays and prediction files.

Defaults follow the original's config for the task (`RECIPES`): COCO panoptic, COCO instance or ADE20K semantic,
their image size, queries, augmentation and optimizer; `backbone=dinov3` takes the DINOv3 zoo's optimizer
settings. Sized for: 4 x H100 at batch 16 for L at 640, like the zoo configs; S and B fit one GPU.
"""

from eomt_jax import annealing, config_lib

# Per task, the original's config whose recipe a run follows: its dataset (for the data-module defaults: image
# size, scale and colour jitter), its training image size, queries, length in epochs and evaluation interval; the
# source that reads a user's dataset of that kind.
RECIPES = {
    "panoptic": dict(zoo="coco_panoptic", source="coco_format", res=640, queries=200, epochs=12, eval_epochs=1),
    "instance": dict(zoo="coco_instance", source="coco_format", res=640, queries=200, epochs=12, eval_epochs=2),
    "semantic": dict(zoo="ade20k_semantic", source="semantic_folder", res=512, queries=100, epochs=31,
                     eval_epochs=1),
}
# The DINOv3 zoo configs (configs/dinov3_*.py): their optimizer settings, length, and the step until which their
# panoptic and semantic configs anneal block 0 (from the first step; the instance config keeps the DINOv2 shape).
DINOV3 = {
    "panoptic": dict(epochs=12, first_block_end=3000,
                     optimizer=dict(lr=2e-4, warmup_steps=(2000, 3000), llrd_l2_enabled=False)),
    "instance": dict(epochs=12, first_block_end=None,
                     optimizer=dict(lr=2e-4, warmup_steps=(2000, 3000), llrd_l2_enabled=False)),
    "semantic": dict(epochs=16, first_block_end=3000,
                     optimizer=dict(lr=2e-4, warmup_steps=(2000, 3000), llrd=1.0, lr_mult=0.1)),
}


def get_config(arg=None):
    a = config_lib.parse_arg(arg, task="panoptic", size="L", backbone="dinov2", res=0, runlocal=False)
    if a.task not in RECIPES:
        raise ValueError(f"task must be one of {tuple(RECIPES)}, got {a.task!r}")
    r = dict(RECIPES[a.task], **(DINOV3[a.task] if a.backbone == "dinov3" else {}))
    # The original's config for the task, in absolute steps of its own run; made relative below.
    c = config_lib.experiment(
        None, task=a.task, dataset=r["zoo"], size=a.size, backbone=a.backbone, resolutions=(a.res or r["res"],),
        num_classes=0, num_queries=r["queries"], epochs=r["epochs"], anneal_starts=(0,), anneal_ends=(1,),
        eval_every_epochs=r["eval_epochs"], optimizer=r.get("optimizer"),
    )
    recipe_steps = c.total_steps
    first = r.get("first_block_end")
    c.schedule.anneal_starts, c.schedule.anneal_ends = annealing.original_fractions(
        c.model.num_blocks, first_block_end=first / recipe_steps if first else None)
    c.schedule.warmup = tuple(w / recipe_steps for w in c.optim.warmup_steps)
    c.schedule.eval_every = c.eval_every_steps / recipe_steps
    c.schedule.checkpoint_every = c.checkpoint_every_steps / recipe_steps
    c.schedule.reference_steps = 0
    c.anneal.starts = c.anneal.ends = ()  # given as fractions
    c.total_steps = 0  # the run's length: --config.epochs=E or --config.total_steps=N
    c.data.name = r["source"]
    c.data.max_instances = 0 if a.task == "semantic" else 100  # semantic: one mask per class
    # The steps of the original's own run, so that the config is complete before start-up fills in the run's.
    c.anneal.starts, c.anneal.ends = annealing.steps_from_fractions(c.schedule.anneal_starts, c.schedule.anneal_ends,
                                                                    recipe_steps)
    if a.runlocal:
        kind, options, num_classes = RUNLOCAL_DATA[a.task]
        c.data.update(dict(generate=kind, root="", **options))
        c.model.num_classes = num_classes
        config_lib.tiny_model(c)
        c.total_steps = 6
        c.log_every_steps = 1
        c.schedule.anneal_starts, c.schedule.anneal_ends = annealing.original_fractions(c.model.num_blocks)
        c.anneal.starts, c.anneal.ends = annealing.steps_from_fractions(c.schedule.anneal_starts,
                                                                        c.schedule.anneal_ends, c.total_steps)
        c.schedule.eval_every = c.schedule.checkpoint_every = 1.0  # at the end
    return c


# The smoke run's generated data (eomt_jax.data.synthetic kind, data options, number of classes), in <workdir>/data.
RUNLOCAL_DATA = {
    "panoptic": ("shapes", {}, 6),
    "instance": ("coco_instance", {}, 80),
    "semantic": ("shapes_semantic", dict(class_names_file="class_names.txt"), 6),
}
