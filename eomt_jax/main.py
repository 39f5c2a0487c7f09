"""`python -m eomt_jax.main --config=configs/X.py[:arg] --workdir=W [--mode=train|eval|train_and_eval|compile]`.

Flags, then the distributed start-up, then one call: `train.run` (train, train_and_eval), `evaluation.run`
(eval) or `compile_report.run` (compile).

Config values are overridden with `--config.key=value` (e.g. `--config.data.root=/data/coco`); the config is
locked, so a misspelt key is an error. A workdir that holds a checkpoint resumes from it.

Exit codes: 0 done; 1 an error (one line `error: ...` for a run that cannot go on: an invalid config, unusable data,
a busy workdir, a non-finite loss, no restorable or a non-fitting checkpoint); 130 / 143 stopped by SIGINT /
SIGTERM after saving its step.

Compiled programs are kept on disk (`eomt_jax.caches`; `EOMT_JAX_COMPILATION_CACHE=off` switches that off), so a
resumed or repeated run skips most of its compilation.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from eomt_jax import caches, compile_report, config_lib, distributed, evaluation, train
from eomt_jax.checkpoints import IncompatibleCheckpoint
from eomt_jax.data import DataError
from eomt_jax.workdir_lock import WorkdirBusy

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/coco_panoptic_large.py:res=640",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and outputs.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "train_and_eval", "compile"],
                          "What to run; compile: compile the train step for the mesh, report memory and FLOPs, exit.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "off"],
                                 "auto: detect TPU pods / SLURM / Open MPI, else one process; off: never initialise.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (explicit multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (explicit multi-process).")
_LOCAL_DEVICE_IDS = flags.DEFINE_string(
    "local_device_ids", None, "Comma-separated accelerator ids this process drives (default: JAX's choice; under "
    "SLURM/Open MPI that is one device per process, numbered by the local rank).")
_TARGET_TOPOLOGY = flags.DEFINE_string(
    "target_topology", None, "With --mode=compile: compile for this accelerator topology instead of the local "
    "devices, e.g. tpu:v5e:4x4, tpu:v4:2x2x2, tpu:v5p:2x2x1 (needs libtpu: pip install -e '.[tpu]'; no TPU).")
flags.mark_flags_as_required(["config", "workdir"])


def check_flags(mode: str, target_topology: str | None) -> None:
    if target_topology and mode != "compile":
        raise app.UsageError(f"--target_topology only applies to --mode=compile, not --mode={mode}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "jax", "orbax", "grain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    check_flags(_MODE.value, _TARGET_TOPOLOGY.value)
    if _MODE.value != "compile":  # the compile report times XLA's compilation: it must compile
        caches.enable_compilation_cache()
    distributed.initialize(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value,
                           _LOCAL_DEVICE_IDS.value)
    config, workdir = _CONFIG.value, _WORKDIR.value
    try:
        if _MODE.value == "eval":
            evaluation.run(config, workdir)
        elif _MODE.value == "compile":
            compile_report.run(config, workdir, target_topology=_TARGET_TOPOLOGY.value)
        else:
            train.run(config, workdir, _MODE.value)
    except train.TrainingInterrupted as e:
        sys.exit(e.exit_code)  # the message is logged where the run stopped
    except (config_lib.ConfigError, DataError, train.TrainingError, WorkdirBusy, IncompatibleCheckpoint) as e:
        sys.exit(f"error: {e}")


def run() -> None:
    """The `eomt-train` command: the same as `python -m eomt_jax.main`."""
    app.run(main)


if __name__ == "__main__":
    run()
