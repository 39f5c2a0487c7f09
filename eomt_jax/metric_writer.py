"""Training metrics: `metrics.jsonl` always; TensorBoard and Weights & Biases when the config enables them."""

from __future__ import annotations

import json
from pathlib import Path

from eomt_jax.atomic import write_file

import jax
import ml_collections


class MetricWriter:
    """metrics.jsonl always; TensorBoard and W&B when enabled. Only process 0 writes."""

    def __init__(self, workdir: Path, config: ml_collections.ConfigDict, resume_step: int = 0):
        """`resume_step`: the step the run starts from; rows of later steps (written by an earlier attempt that
        went past its last checkpoint) are dropped, so that every step appears once however often a run resumes."""
        self.active = jax.process_index() == 0
        if self.active:
            _truncate_after(workdir / "metrics.jsonl", resume_step)
        self._jsonl = open(workdir / "metrics.jsonl", "a") if self.active else None
        self._tb = None
        self._wandb = None
        if self.active and config.log.tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(str(workdir / "tensorboard"))
        if self.active and config.log.wandb:
            try:
                import wandb
            except ImportError:
                raise ImportError("config.log.wandb=True needs the wandb package (pip install wandb)") from None
            self._wandb = wandb.init(project=config.log.wandb_project, dir=str(workdir), config=config.to_dict())

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        clean = {k: float(v) for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(clean, step=step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    """Keep the rows of `path` up to `step` (and drop a last row cut short by a kill); atomic."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            kept.append(line)
    write_file(path, "".join(line + "\n" for line in kept).encode())
