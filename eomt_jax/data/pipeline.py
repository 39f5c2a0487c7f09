"""Grain pipelines that turn a source into fixed-shape batches for a jitted step, sharded across processes.

Training (`train_dataset` + `TrainIterator`):

    source (unreadable samples replaced, `SkipUnreadable`) -> seeded shuffle (a new order each epoch) -> repeat -> augment (`TrainTransform`, seeded per
    element) -> this process's rows of each global batch -> drop skipped samples -> batch ->
    optional worker processes -> global `jax.Array`s (`jax.make_array_from_process_local_data`)

Augmentation is keyed by the element's position in the global stream, and process p reads rows
[p * B/P, (p + 1) * B/P) of every global batch of B, so the global batch is the same, row for row, whatever the
number of processes (and so are the loss's per-image random draws).
(A sample skipped by `TrainTransform`, which is rare and logged, shifts its process's stream from then on.)
A global batch holds `image` uint8 (B, S, S, 3), `masks` bool (B, M, S, S), `labels` int32 (B, M),
`valid` bool (B, M) and `is_crowd` bool (B, M). Masks travel bit-packed from the workers to the device by
default (`TrainSettings.pack_masks`) and are unpacked there.

The iterator state (`TrainIterator.get_state()`, or `grain.checkpoint.CheckpointSave(it.grain_iterator)` in
an Orbax checkpoint) restores exactly the same next batches. It depends on the number of worker processes:
resume with the same `num_workers`.

Evaluation reads the source directly (`eomt_jax.evaluation.loop`): it needs each image at its original size.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np

from eomt_jax.data.archives import DataError
from eomt_jax.data.sources import Source
from eomt_jax.data.transforms import TrainTransform

log = logging.getLogger("eomt_jax")

TRAIN_KEYS = ("image", "masks", "labels", "valid", "is_crowd")

# Upstream data-module settings per dataset: training image size, colour jitter, scale-jitter range.
DATASET_DEFAULTS = {
    "coco_panoptic": dict(image_size=640, color_jitter=False, scale_range=(0.1, 2.0)),
    "coco_instance": dict(image_size=640, color_jitter=False, scale_range=(0.1, 2.0)),
    "ade20k_panoptic": dict(image_size=640, color_jitter=True, scale_range=(0.1, 2.0)),
    "ade20k_semantic": dict(image_size=512, color_jitter=True, scale_range=(0.5, 2.0)),
    "cityscapes_semantic": dict(image_size=1024, color_jitter=True, scale_range=(0.5, 2.0)),
    "coco_format": dict(image_size=640, color_jitter=False, scale_range=(0.1, 2.0)),
    # Not upstream: the generated demo data (128 px), where a 0.1 scale would shrink shapes to a few pixels.
    "shapes": dict(image_size=128, color_jitter=False, scale_range=(0.5, 1.5)),
}


def _allow_grain_workers() -> None:
    # Grain's worker processes read an absl flag; outside `absl.app.run` (tests, notebooks, plain scripts)
    # reading it raises UnparsedFlagAccessError unless the flags are marked as parsed.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} out of range for process_count {count}")
    return index, count


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """Everything that shapes the training stream, with the COCO panoptic defaults of the original."""

    image_size: int = 640
    batch_size: int = 16  # global, over all processes
    max_instances: int = 100
    seed: int = 0
    scale_range: tuple[float, float] = (0.1, 2.0)
    color_jitter: bool = False
    num_workers: int = 0  # Grain worker processes per JAX process; 0 = decode in this process
    num_threads: int = 2  # reading threads per process (per worker when num_workers > 0)
    max_redraws: int = 10
    # Ship masks bit-packed (8x fewer bytes) from the workers and unpack them on the device (see
    # `make_global_batch`): `TrainIterator` batches are the same either way, the raw `train_dataset` batches
    # carry `masks_packed` instead of `masks`. Unpacked masks (100 x 640 x 640 bytes per image) make the
    # transfer from worker processes the bottleneck.
    pack_masks: bool = True
    # Unreadable samples (a damaged image or target in a dataset zip) are replaced by the next readable one, with a
    # warning naming each; the run stops when more than this fraction of the dataset is unreadable.
    max_unreadable_fraction: float = 0.01

    @classmethod
    def for_dataset(cls, name: str, **overrides) -> TrainSettings:
        return cls(**{**DATASET_DEFAULTS.get(name, {}), **overrides})

    @classmethod
    def from_config(cls, data, seed: int) -> TrainSettings:
        """The settings of an experiment config's `data` section."""
        return cls(image_size=data.image_size, batch_size=data.batch_size, max_instances=data.max_instances,
                   seed=seed, scale_range=tuple(data.scale_range), color_jitter=data.color_jitter,
                   num_workers=data.num_workers, max_unreadable_fraction=data.max_unreadable_fraction)


def train_dataset(source: Source, settings: TrainSettings, *, process_index: int | None = None,
                  process_count: int | None = None, start: int = 0) -> grain.IterDataset:
    """This process's stream of training batches (numpy dicts with `TRAIN_KEYS`, batch_size / processes rows;
    with `settings.pack_masks`, `masks_packed` replaces `masks`: read it through `TrainIterator`).

    `process_index`/`process_count` default to JAX's; pass them to simulate another process. `start` is a global
    position in the augmented stream: the stream begins there, whatever the number of processes, so a run can
    continue on another topology from `start = samples consumed so far` (exact unless samples were skipped).
    """
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    index, count = _process(process_index, process_count)
    if settings.batch_size % count:
        raise ValueError(f"batch_size {settings.batch_size} is not divisible by {count} processes")
    transform = TrainTransform(settings.image_size, settings.max_instances, tuple(settings.scale_range),
                               settings.color_jitter, settings.max_redraws, settings.pack_masks)
    ds = grain.MapDataset.source(SkipUnreadable(source, settings.max_unreadable_fraction))
    ds = ds.shuffle(seed=settings.seed).repeat()
    # Augment before slicing: the random draws then follow the global position, not the process's.
    ds = ds.random_map(transform, seed=settings.seed)
    if start:
        ds = ds[start:]
    ds = _ProcessRows(ds, settings.batch_size, index, count)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=settings.num_threads, prefetch_buffer_size=8))
    ds = ds.batch(settings.batch_size // count, drop_remainder=True)
    if settings.num_workers > 0:
        _allow_grain_workers()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=settings.num_workers))
    return ds


class SkipUnreadable:
    """A source whose unreadable records (`DataError`: a damaged image or target file) are replaced by the next
    readable record, so that the stream keeps its length and order. Each unreadable record is logged once, naming
    its file; more than `max_fraction` of the source unreadable (counted in each reading process) is an error."""

    def __init__(self, source: Source, max_fraction: float):
        self.source = source
        self.max_fraction = max_fraction
        self._bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int):
        n = len(self.source)
        for k in range(n):
            i = (index + k) % n
            if i in self._bad:
                continue
            try:
                return self.source[i]
            except DataError as e:
                self._bad.add(i)
                log.warning("skipping unreadable training sample %d (%d so far): %s", i, len(self._bad), e)
                if len(self._bad) > max(1, self.max_fraction * n):
                    raise DataError(
                        f"{len(self._bad)} of {n} training samples are unreadable, more than "
                        f"data.max_unreadable_fraction={self.max_fraction}; the last: {e}") from None
        raise DataError(f"no readable training sample in {self.source!r}")


class _ProcessRows(grain.MapDataset):
    """Process `index`'s contiguous block of rows of every global batch of `global_batch` elements."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, index: int, count: int):
        super().__init__(parent)
        self._global, self._local, self._index = global_batch, global_batch // count, index

    def __len__(self) -> int:
        return len(self._parent) // self._global * self._local

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self.slice(i)
        row = (i // self._local) * self._global + self._index * self._local + i % self._local
        return self._parent[row]

    def __str__(self) -> str:
        return f"ProcessRows(global_batch={self._global}, process={self._index})"


@functools.lru_cache(maxsize=None)
def _unpacker(width: int, sharding: jax.sharding.Sharding):
    return jax.jit(lambda packed: jnp.unpackbits(packed, axis=-1, count=width).astype(bool),
                   out_shardings=sharding)


def unpack_masks(packed: np.ndarray, width: int) -> np.ndarray:
    """Host-side inverse of `pack_masks`: uint8 (..., ceil(S / 8)) -> bool (..., S)."""
    return np.unpackbits(packed, axis=-1, count=width).astype(bool)


def make_global_batch(local: Mapping[str, np.ndarray], sharding: jax.sharding.Sharding,
                      keys: tuple[str, ...] = TRAIN_KEYS) -> dict[str, jax.Array]:
    """Assemble each process's rows into global arrays sharded along the batch axis by `sharding`.

    Bit-packed masks (`masks_packed`) cross to the device packed and are unpacked there into `masks`.
    """
    batch = {}
    for k in keys:
        if k == "masks" and "masks" not in local and "masks_packed" in local:
            packed = jax.make_array_from_process_local_data(sharding, np.asarray(local["masks_packed"]))
            batch[k] = _unpacker(local["image"].shape[2], sharding)(packed)
        else:
            batch[k] = jax.make_array_from_process_local_data(sharding, np.asarray(local[k]))
    return batch


class TrainIterator:
    """Iterator of global training batches with a saveable position (numpy batches when `sharding` is None;
    bit-packed masks are unpacked either way, so batches always carry bool `masks`).

        it = TrainIterator(train_dataset(source, settings), NamedSharding(mesh, P("data")))
        batch = next(it)                   # dict of global jax.Arrays
        state = it.get_state()             # JSON-serialisable; or checkpoint `it.grain_iterator` with Orbax
        it.set_state(state)                # the next batches repeat exactly
    """

    def __init__(self, dataset: grain.IterDataset, sharding: jax.sharding.Sharding | None):
        self.grain_iterator = iter(dataset)
        self._sharding = sharding

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        local = next(self.grain_iterator)
        if self._sharding is not None:
            return make_global_batch(local, self._sharding)
        if "masks_packed" in local:
            local = dict(local)
            local["masks"] = unpack_masks(local.pop("masks_packed"), local["image"].shape[2])
        return local

    def get_state(self) -> dict[str, Any]:
        return self.grain_iterator.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.grain_iterator.set_state(state)

    def close(self) -> None:
        close = getattr(self.grain_iterator, "close", None)
        if close is not None:
            close()
