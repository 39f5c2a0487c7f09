"""Training metrics: `metrics.jsonl` always; TensorBoard and Weights & Biases when the config enables them."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections


class MetricWriter:
    """metrics.jsonl always; TensorBoard and W&B when enabled. Only process 0 writes."""

    def __init__(self, workdir: Path, config: ml_collections.ConfigDict):
        self.active = jax.process_index() == 0
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
