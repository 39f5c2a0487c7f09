"""Throughput of the training input pipeline, in images per second.

    python -m eomt_jax.data.throughput [--dataset coco_panoptic --root DIR] [--num-workers 0] [--image-size 640]

Without `--root` it first generates COCO-panoptic-style data (640 x 480 images, up to 20 segments) in a
temporary folder. The figure to compare with a training step is images/s per worker process: a GPU step of
batch B taking t seconds needs B / t images/s from all workers together.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from eomt_jax.data import load_source, synthetic
from eomt_jax.data.pipeline import TrainSettings, train_dataset


def measure(source, settings: TrainSettings, num_batches: int, warmup: int = 2) -> float:
    """Images per second over `num_batches` batches, after `warmup` batches (worker start-up excluded)."""
    it = iter(train_dataset(source, settings, process_index=0, process_count=1))
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    elapsed = time.perf_counter() - start
    close = getattr(it, "close", None)
    if close:
        close()
    return num_batches * settings.batch_size / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="coco_panoptic")
    parser.add_argument("--root", default=None, help="dataset folder (default: generate COCO-style data)")
    parser.add_argument("--num-images", type=int, default=48, help="images to generate without --root")
    parser.add_argument("--image-size", type=int, default=None, help="default: the dataset's training size")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-instances", type=int, default=100)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=1, help="reading threads per process")
    parser.add_argument("--num-batches", type=int, default=12)
    parser.add_argument("--no-pack-masks", dest="pack_masks", action="store_false",
                        help="ship bool masks from the workers instead of bit-packed ones")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            if args.dataset != "coco_panoptic":
                parser.error("without --root only --dataset coco_panoptic can be generated")
            root = os.path.join(tmp, "coco")
            # Typical COCO geometry: 640 x 480 images, about a dozen segments each.
            synthetic.write_coco_panoptic(root, num_train=args.num_images, num_val=1, size=640, max_segments=20,
                                          shape=(480, 640))
        source = load_source(args.dataset, root, "train")
        overrides = dict(batch_size=args.batch_size, max_instances=args.max_instances,
                         num_workers=args.num_workers, num_threads=args.num_threads, pack_masks=args.pack_masks)
        if args.image_size:
            overrides["image_size"] = args.image_size
        settings = TrainSettings.for_dataset(args.dataset, **overrides)
        rate = measure(source, settings, args.num_batches)
    processes = max(1, args.num_workers)
    packed = "" if args.pack_masks else ", unpacked masks"
    print(f"{args.dataset} at {settings.image_size}px, batch {settings.batch_size}, max_instances "
          f"{settings.max_instances}{packed}, {args.num_workers} workers x {args.num_threads} threads on "
          f"{os.cpu_count()} cores: {rate:.1f} images/s ({rate / processes:.1f} per worker process)")

if __name__ == "__main__":
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    main()
