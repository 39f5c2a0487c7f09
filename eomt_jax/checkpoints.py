"""Training checkpoints: model + optimizer state + step + RNG, and the data iterator's position (Orbax).

Orbax writes each step into a temporary directory and renames it when complete, so a run killed mid-save never
leaves a checkpoint that restores to garbage; restore targets carry the *current* shardings, so a checkpoint
written on one mesh restores onto another.

Each checkpoint holds three items: `state` (the train state), `data` (each process's Grain iterator state) and
`data_position` (JSON: the global position of the training stream and the topology that wrote it). A run resumed
with the same number of processes and data workers restores the Grain states exactly; on any other topology
the stream restarts at the saved global position instead (see `DataPosition`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from eomt_jax import distributed
from eomt_jax.tree import path_str


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the training stream stands, independently of how many processes read it.

    The stream of the current run was built to begin at global sample `offset` when the train state was at
    `offset_step`; every step consumes `batch_size` (global) samples. `process_count` and `num_workers` are the
    topology whose per-process Grain states were saved with it.
    """

    offset: int
    offset_step: int
    batch_size: int
    process_count: int
    num_workers: int

    def samples_at(self, step: int) -> int:
        """Global samples consumed when the state is at `step` (= where a fresh stream must begin)."""
        return self.offset + (step - self.offset_step) * self.batch_size

    def same_topology(self, other: "DataPosition") -> bool:
        return (self.batch_size, self.process_count, self.num_workers) == (
            other.batch_size, other.process_count, other.num_workers)


# The items of every checkpoint step.
ITEMS = ("state", "data", "data_position")

# Where checkpoints that failed to restore are moved (beside the checkpoint directory).
DAMAGED = "damaged_checkpoints"


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete checkpoint step, oldest first."""
        return sorted(self._manager.all_steps())

    def set_aside(self, step: int) -> Path:
        """Move checkpoint `step` out of the way (to `<directory>/../damaged_checkpoints/<step>`) so that the run can
        save that step again; returns where it went."""
        aside = self.directory.parent / DAMAGED / str(step)
        if jax.process_index() == 0:
            aside.parent.mkdir(parents=True, exist_ok=True)
            if aside.exists():
                aside = aside.with_name(f"{step}-{len(list(aside.parent.iterdir()))}")
            (self.directory / str(step)).rename(aside)
        distributed.barrier(f"set_aside_{step}")
        self._manager.reload()
        return aside

    def save(self, step: int, state: Any, data_iterator=None, position: DataPosition | None = None) -> None:
        import grain

        items = {"state": ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        if position is not None:
            items["data_position"] = ocp.args.JsonSave(dataclasses.asdict(position))
        self._manager.save(step, args=ocp.args.Composite(**items), force=True)

    def data_position(self, step: int) -> DataPosition | None:
        """The saved stream position of `step`, or None for a checkpoint written without one."""
        if not (self.directory / str(step) / "data_position").exists():
            return None
        saved = self._manager.restore(step, args=ocp.args.Composite(data_position=ocp.args.JsonRestore()))
        return DataPosition(**saved["data_position"])

    def restore(self, step: int, abstract_state: Any) -> Any:
        """The train state of `step`, restored onto `abstract_state` (ShapeDtypeStructs with shardings).

        Raises `IncompatibleCheckpoint` (one line naming the first differing array) when the checkpoint holds
        other arrays or shapes than `abstract_state`, e.g. after an architecture change in the config.
        """
        check_compatible(self.directory / str(step) / "state", abstract_state)
        return self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))[
            "state"]

    def restore_data(self, step: int, data_iterator) -> None:
        """Reset `data_iterator` in place to its Grain state saved at `step` (same processes and workers)."""
        import grain

        self._manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(data_iterator)))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class IncompatibleCheckpoint(ValueError):
    """A checkpoint whose arrays do not fit the configured model and optimizer."""


def check_compatible(state_dir: Path, abstract_state: Any) -> None:
    """Compare the array paths and shapes stored in `state_dir` (a checkpoint's `state` item) with
    `abstract_state`; raise `IncompatibleCheckpoint` naming the first difference, parameters first."""
    stored = _stored_shapes(state_dir)
    wanted = _shapes(abstract_state)
    order = sorted(set(stored) | set(wanted), key=lambda k: (not k.startswith("params/"), k))
    for key in order:
        if key not in stored:
            problem = f"{key} is missing from the checkpoint, which the config's model needs"
        elif key not in wanted:
            problem = f"the checkpoint holds {key}, which the config's model does not have"
        elif stored[key] != wanted[key]:
            problem = f"{key} has shape {stored[key]} in the checkpoint but {wanted[key]} in the config's model"
        else:
            continue
        raise IncompatibleCheckpoint(
            f"{state_dir.parent} does not fit the config: {problem} (was model or optim changed since it was "
            "written? resume with the config that wrote it, or start a new --workdir)")


def _stored_shapes(state_dir: Path) -> dict[str, tuple[int, ...]]:
    from etils import epath

    metadata = ocp.StandardCheckpointHandler().metadata(epath.Path(state_dir))
    return _shapes(getattr(metadata, "tree", metadata))


def _shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'params/backbone/cls_token' -> shape; a Variable's stored `value` level is not part of the name."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {path_str(p).removesuffix("/value"): tuple(leaf.shape) for p, leaf in leaves if hasattr(leaf, "shape")}


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a tree of arrays, as restore targets."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def latest_step(directory: str | Path) -> int | None:
    """The newest complete checkpoint step in `directory`, or None (also when the directory does not exist)."""
    directory = Path(directory).absolute()
    if not directory.exists():
        return None
    with ocp.CheckpointManager(directory, item_names=ITEMS) as manager:
        return manager.latest_step()


def restore_network(directory: str | Path, step: int, params: Any, buffers: Any) -> tuple[Any, Any]:
    """Only the network (parameters and buffers) of a training checkpoint, whatever its optimizer state was;
    `params` and `buffers` (arrays or ShapeDtypeStructs) give the target shapes and shardings."""
    target = {"params": abstract_like(params), "buffers": abstract_like(buffers)}
    with ocp.CheckpointManager(Path(directory).absolute(), item_names=ITEMS) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, partial_restore=True)))["state"]
    return restored["params"], restored["buffers"]
