"""Test-wide set-up: an 8-device fake CPU mesh and full-precision matmuls.

The device count must be fixed before JAX initialises its backends, so it is set here, before any test
module imports jax.
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Parity tests compare float32 results with PyTorch; never let XLA pick a reduced matmul precision.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# Many tests compile the same small programs (e.g. every config's smoke run builds the same tiny model); a
# compilation cache keyed by the program text lets them share executables within and across runs.
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "eomt_jax_test_xla"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
