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


class Checkpointer:
    def __init__(self, directory: str | Path, *, max_to_keep: int = 3):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

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

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
        """Restore onto `abstract_state` (ShapeDtypeStructs with shardings); `data_iterator`, when given, is reset
        in place to its saved Grain state (same processes and workers as when saved)."""
        import grain

        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


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
