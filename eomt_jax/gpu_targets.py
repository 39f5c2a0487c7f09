"""Descriptions of NVIDIA GPUs for XLA's GPU compiler, to compile for a GPU that is not attached.

`mesh.topology_devices("gpu:h100:4")` hands one of these to the CUDA plugin (`pip install -e ".[cuda]"`), which
then gives compile-only devices of that model: programs compiled for them are the GPU compiler's own (sm_90a code
for an H100, its fusions, its memory plan), with no GPU on the machine.

The texts are `stream_executor.GpuTargetConfigProto`s in text form, XLA's own descriptions from
openxla/xla `xla/backends/gpu/target_config/specs/` (h100_sxm.txtpb, h200.txtpb, a100_sxm_80.txtpb; Copyright
The OpenXLA Authors, Apache License 2.0), less their `collective_memory_granularity` line, a field newer than
jaxlib 0.10.2's proto (which refuses a text that names it).
"""

from __future__ import annotations

H100_SXM = """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: 84942979072
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
    feature_extension: ACCELERATED_FEATURES
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  scalar_unit_description {
    rate_infos {
      key: 4
      value {
        clock_rate_ghz: 1.98
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 8
      value {
        clock_rate_ghz: 1.98
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 10
      value {
        clock_rate_ghz: 1.98
        units_per_core: 128
        ops_per_clock: 2
      }
    }
    rate_infos {
      key: 11
      value {
        clock_rate_ghz: 1.98
        units_per_core: 128
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 12
      value {
        clock_rate_ghz: 1.98
        units_per_core: 64
        ops_per_clock: 1
      }
    }
    rate_infos {
      key: 16
      value {
        clock_rate_ghz: 1.98
        units_per_core: 128
        ops_per_clock: 2
      }
    }
  }
  matrix_unit_description {
    rate_infos {
      key: 2
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 6
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 10
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 512
      }
    }
    rate_infos {
      key: 11
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 256
      }
    }
    rate_infos {
      key: 12
      value {
        clock_rate_ghz: 1.98
        units_per_core: 4
        ops_per_clock: 32
      }
    }
    rate_infos {
      key: 16
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 512
      }
    }
    rate_infos {
      key: 19
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 20
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 23
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 24
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 25
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 28
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 29
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 33
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 35
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
    rate_infos {
      key: 36
      value {
        clock_rate_ghz: 1.8295201
        units_per_core: 4
        ops_per_clock: 1024
      }
    }
  }
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability 9.0a"
  model_str: "sm_9.0a with 84942979072B RAM, 132 cores, 1980000KHz clock, 2619000KHz mem clock, 52428800B L2$"
  device_address_bits: 64
  pcie_bandwidth: 34359738368
  ecc_enabled: true
  name: "NVIDIA H100 80GB HBM3"
  driver_version: "13.0.0"
  runtime_version: "12.8.0"
  compile_time_toolkit_version: "12.8.0"
  dnn_version: "9.10.0"
  cub_version: "3.1.2"
  device_interconnect_info {
    active_links: 18
  }
}
platform_name: "CUDA"
dnn_version_info {
  major: 8
  minor: 9
  patch: 4
}
device_description_str: "NVIDIA H100 80GB HBM3"
"""

def _variant(text: str, changes: list[tuple[str, str]]) -> str:
    """`text` with each `old` line (present exactly once) replaced by `new`."""
    for old, new in changes:
        if text.count(old) != 1:
            raise ValueError(f"expected one {old!r} in the base description")
        text = text.replace(old, new)
    return text


# XLA's h200.txtpb is h100_sxm.txtpb with the H200's memory (size, bandwidth, clock), name and cuDNN version.
H200 = _variant(H100_SXM, [
    ("memory_bandwidth: 3352320000000", "memory_bandwidth: 4800000000000"),
    ("device_memory_size: 84942979072", "device_memory_size: 151397597184"),
    ('model_str: "sm_9.0a with 84942979072B RAM, 132 cores, 1980000KHz clock, 2619000KHz mem clock, 52428800B L2$"',
     'model_str: "sm_9.0a with 151397597184B RAM, 132 cores, 1980000KHz clock, 3750000KHz mem clock, 52428800B L2$"'),
    ('name: "NVIDIA H100 80GB HBM3"', 'name: "NVIDIA H200 141GB HBM3e"'),
    ("major: 8\n  minor: 9\n  patch: 4", "major: 9\n  minor: 10\n  patch: 0"),
    ('device_description_str: "NVIDIA H100 80GB HBM3"', 'device_description_str: "NVIDIA H200 141GB HBM3e"'),
])

A100_SXM_80GB = """\
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 167936
  threads_per_core_limit: 2048
  core_count: 108
  fpus_per_core: 64
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 2039040000000
  l2_cache_size: 41943040
  clock_rate_ghz: 1.41
  device_memory_size: 85100068864
  shared_memory_per_block_optin: 166912
  cuda_compute_capability {
    major: 8
    feature_extension: NONE
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  dnn_version: "8.9.4"
  thread_dim_limit_x: 1024
  thread_dim_limit_y: 1024
  thread_dim_limit_z: 64
}
platform_name: "CUDA"
dnn_version_info {
  major: 8
  minor: 9
  patch: 4
}
device_description_str: "NVIDIA A100-SXM4-80GB"
"""

# --target_topology=gpu:<model>:<count> names a model by these keys.
GPU_TARGETS = {"h100": H100_SXM, "h200": H200, "a100": A100_SXM_80GB}


def target_config(model: str) -> str:
    """The GpuTargetConfigProto text of a GPU model ("h100", "h200", "a100")."""
    try:
        return GPU_TARGETS[model.lower()]
    except KeyError:
        raise ValueError(f"no description of the GPU {model!r}; known: {', '.join(sorted(GPU_TARGETS))}") from None
