"""What eomt_jax keeps on disk to start faster: compiled programs and checkpoints converted from hub ids, under
`$EOMT_JAX_CACHE`, else `$XDG_CACHE_HOME/eomt_jax`, else `~/.cache/eomt_jax`.

The persistent compilation cache keeps compiled XLA programs, so that a second run of the same model at the same
shapes (prediction, evaluation, training, `eomt_jax.Segmenter`) starts without compiling. On by default, in
`<cache>/xla`. `EOMT_JAX_COMPILATION_CACHE=off` switches it off, `EOMT_JAX_COMPILATION_CACHE=DIR` moves it.
A cache directory already chosen through JAX itself (`JAX_COMPILATION_CACHE_DIR`, `jax.config`) is left as it is.

Every program is kept, however fast it compiled: start-up is the sum of many small compilations (the network,
each post-processing canvas, the optimizer's set-up). JAX keys the entries by the program, the compiler options
and flags, the JAX version, and the platform and topology of the devices. Only process 0 writes entries, and
programs with host callbacks (a training step matching with scipy) are never stored.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import jax

log = logging.getLogger(__name__)

SWITCH = "EOMT_JAX_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no", "none")


def cache_root() -> Path:
    """Where eomt_jax keeps what it can rebuild: compiled programs and checkpoints converted from hub ids."""
    if os.environ.get("EOMT_JAX_CACHE"):
        return Path(os.environ["EOMT_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "eomt_jax"


def hub_checkpoint(hub_id: str) -> Path:
    """The converted checkpoint directory of a Hugging Face hub id (`owner/name`)."""
    return cache_root() / "checkpoints" / hub_id.replace("/", "--")


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> Path | None:
    """Turn the persistent compilation cache on (see the module docstring); returns its directory, or None when
    it is switched off. Call before the first compilation: JAX decides once per process whether it caches."""
    current = jax.config.jax_compilation_cache_dir
    if current and directory is None:
        return Path(current)
    setting = os.environ.get(SWITCH, "")
    if directory is None and setting.lower() in _OFF and setting:
        return None
    path = Path(directory or setting or cache_root() / "xla").expanduser().absolute()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache off: cannot create %s (%s)", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    log.info("compiled programs are cached in %s (%s=off switches that off)", path, SWITCH)
    return path
