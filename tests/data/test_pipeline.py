import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from eomt_jax.data import load_source
from eomt_jax.data.pipeline import TRAIN_KEYS, TrainIterator, TrainSettings, train_dataset

# Unpacked masks: the raw numpy batches then show the batch contract directly.
SETTINGS = TrainSettings(image_size=32, batch_size=8, max_instances=6, seed=7, scale_range=(0.5, 1.5),
                         pack_masks=False)


@pytest.fixture(scope="module")
def shapes(generated):
    return load_source("coco_format", generated["shapes"][0], "train")


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert sorted(x) == sorted(y)
        for key in x:
            np.testing.assert_array_equal(np.asarray(x[key]), np.asarray(y[key]), err_msg=key)


def test_batch_shapes_and_epochs(shapes):
    batches = take(iter(train_dataset(shapes, SETTINGS, process_index=0, process_count=1)), 4)
    b = batches[0]
    assert sorted(b) == sorted(TRAIN_KEYS)
    assert b["image"].shape == (8, 32, 32, 3) and b["image"].dtype == np.uint8
    assert b["masks"].shape == (8, 6, 32, 32) and b["masks"].dtype == bool
    assert b["labels"].dtype == np.int32 and b["valid"].shape == b["is_crowd"].shape == (8, 6)
    assert b["valid"].any(axis=1).all()
    # 24 images, batch 8: batches 0-2 are epoch 1, batch 3 starts epoch 2 with a new order and new draws.
    assert not any(np.array_equal(batches[3]["image"], x["image"]) for x in batches[:3])


def test_two_processes_split_the_global_batch(shapes):
    single = take(iter(train_dataset(shapes, SETTINGS, process_index=0, process_count=1)), 3)
    parts = [take(iter(train_dataset(shapes, SETTINGS, process_index=p, process_count=2)), 3) for p in (0, 1)]
    for step, whole in enumerate(single):
        for key in TRAIN_KEYS:
            p0, p1 = parts[0][step][key], parts[1][step][key]
            assert len(p0) == len(p1) == 4
            # Process p holds rows [4p, 4p + 4) of the global batch: the halves, in order, make the batch.
            np.testing.assert_array_equal(p0, whole[key][:4])
            np.testing.assert_array_equal(p1, whole[key][4:])
    assert not np.array_equal(parts[0][0]["image"], parts[1][0]["image"])


def test_stream_restarts_at_a_global_position_on_any_topology(shapes):
    # What a resume on another number of processes does: begin at `samples consumed so far`.
    single = take(iter(train_dataset(shapes, SETTINGS, process_index=0, process_count=1)), 4)
    start = 2 * SETTINGS.batch_size
    parts = [take(iter(train_dataset(shapes, SETTINGS, process_index=p, process_count=2, start=start)), 2)
             for p in (0, 1)]
    for step in range(2):
        for key in TRAIN_KEYS:
            joined = np.concatenate([parts[0][step][key], parts[1][step][key]])
            np.testing.assert_array_equal(joined, single[2 + step][key])
    with pytest.raises(ValueError, match="start must be >= 0"):
        train_dataset(shapes, SETTINGS, start=-1)


def test_global_arrays_are_sharded_over_the_mesh(shapes):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    it = TrainIterator(train_dataset(shapes, SETTINGS, process_index=0, process_count=1), sharding)
    batch = next(it)
    reference = next(iter(train_dataset(shapes, SETTINGS, process_index=0, process_count=1)))
    for key in TRAIN_KEYS:
        assert isinstance(batch[key], jax.Array) and batch[key].sharding == sharding
        assert len(batch[key].addressable_shards) == 8
        np.testing.assert_array_equal(np.asarray(batch[key]), reference[key])


def test_state_restore_repeats_the_next_batches(shapes):
    it = TrainIterator(train_dataset(shapes, SETTINGS), None)
    take(it, 4)  # crosses an epoch boundary (24 images, batch 8)
    state = json.loads(json.dumps(it.get_state()))  # must survive a JSON round trip (checkpoint file)
    expected = take(it, 3)
    fresh = TrainIterator(train_dataset(shapes, SETTINGS), None)
    fresh.set_state(state)
    assert_batches_equal(take(fresh, 3), expected)


def test_state_restore_with_worker_processes(shapes):
    # Workers with the default bit-packed masks, as training runs.
    settings = TrainSettings(**{**SETTINGS.__dict__, "num_workers": 2, "num_threads": 1, "pack_masks": True})
    it = TrainIterator(train_dataset(shapes, settings), None)
    take(it, 3)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 2)
    it.close()
    fresh = TrainIterator(train_dataset(shapes, settings), None)
    fresh.set_state(state)
    got = take(fresh, 2)
    fresh.close()
    assert_batches_equal(got, expected)


def test_packed_masks_give_the_same_global_batch(shapes):
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    packed_settings = TrainSettings(**{**SETTINGS.__dict__, "pack_masks": True, "image_size": 36})
    plain_settings = TrainSettings(**{**SETTINGS.__dict__, "image_size": 36})  # 36 is not a multiple of 8
    raw = next(iter(train_dataset(shapes, packed_settings)))
    assert "masks" not in raw and raw["masks_packed"].shape == (8, 6, 36, 5)
    plain = next(iter(train_dataset(shapes, plain_settings)))
    on_device = next(TrainIterator(train_dataset(shapes, packed_settings), sharding))
    on_host = next(TrainIterator(train_dataset(shapes, packed_settings), None))
    assert on_device["masks"].dtype == bool and on_device["masks"].sharding == sharding
    for key in TRAIN_KEYS:
        np.testing.assert_array_equal(np.asarray(on_device[key]), plain[key])
        np.testing.assert_array_equal(on_host[key], plain[key])


def test_iterator_state_in_an_orbax_checkpoint(shapes, tmp_path):
    import grain
    import orbax.checkpoint as ocp

    it = TrainIterator(train_dataset(shapes, SETTINGS), None)
    take(it, 2)
    manager = ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",))
    manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it.grain_iterator)))
    manager.wait_until_finished()
    expected = take(it, 2)
    fresh = TrainIterator(train_dataset(shapes, SETTINGS), None)
    manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh.grain_iterator)))
    assert_batches_equal(take(fresh, 2), expected)
