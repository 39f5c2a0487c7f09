"""CPU demo: train a small EoMT from scratch on the generated `shapes` panoptic dataset, evaluate PQ, draw overlays.

    python -m eomt_jax.main --config=configs/demo_shapes.py --workdir=workdir/demo --mode=train_and_eval

The dataset (512 train / 64 val images at 128 px, COCO panoptic layout; see `eomt_jax.data.synthetic`) is generated
into `<workdir>/data` on first use. Sized for a 2-core laptop CPU: 300 steps of batch 16 from scratch; the README
gives the PQ and wall time measured on one. `:steps=N` trains for N steps instead; `:runlocal` is a 2-step smoke
run of a tiny model at 64 px.
"""

from eomt_jax import config_lib
from eomt_jax.models.eomt import EoMTConfig


def get_config(arg=None):
    a = config_lib.parse_arg(arg, runlocal=False, steps=300)
    c = config_lib.experiment(
        None, task="panoptic", dataset="coco_panoptic", size="S", resolutions=(128,), num_classes=6, num_queries=16,
        epochs=1, anneal_starts=(0, 0), anneal_ends=(1, 1),
    )
    c.total_steps = a.steps
    c.schedule.reference_steps = a.steps  # --config.total_steps=N rescales the step values below to N steps
    c.log_every_steps = 20
    c.eval_every_steps = a.steps
    c.checkpoint_every_steps = 100
    c.data.name = "shapes"
    c.data.generate = "shapes"
    c.data.image_size = 128
    c.data.batch_size = 16
    c.data.max_instances = 8  # at most 3 stuff + 3 things per image
    c.data.scale_range = (0.5, 1.5)
    c.data.num_workers = 0
    model = EoMTConfig(
        embed_dim=192, depth=6, num_heads=3, patch_size=16, image_size=(128, 128), num_registers=4, mlp_type="gelu",
        mlp_hidden=768, num_queries=16, num_classes=6, num_blocks=2, layerscale_init=0.1,
    ).to_dict()
    model["image_size"] = (128, 128)
    c.model = dict(model, dtype="float32")
    # Masked attention is annealed away over the first two thirds of training.
    c.anneal.starts = (0, a.steps // 3)
    c.anneal.ends = (a.steps // 3, 2 * a.steps // 3)
    c.loss.num_points = 256
    # From scratch, no pretrained backbone: no layer-wise decay, short warm-ups, a larger base LR.
    c.optim.lr = 1e-3
    c.optim.llrd = 1.0
    c.optim.warmup_steps = (20, 20)
    c.eval.batch_size = 16
    c.log.tensorboard = True
    if a.runlocal:
        c.total_steps = 2
        c.log_every_steps = 1
        c.eval_every_steps = 2
        c.checkpoint_every_steps = 2
        c.data.batch_size = 8
        c.data.image_size = 64
        c.data.generate_kwargs = dict(num_train=16, num_val=8, size=64)
        c.model.update(embed_dim=64, depth=3, num_heads=2, mlp_hidden=128, num_queries=8, image_size=(64, 64))
        c.eval.max_images = 8
        c.anneal.starts, c.anneal.ends = (0, 1), (1, 2)
        c.anneal.allow_unfinished = True  # a 2-step smoke run cannot finish two phases before its last step
        c.schedule.reference_steps = 0
    return c
