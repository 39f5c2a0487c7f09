"""Meshes within one process (8 fake CPU devices): FSDP sharding rules and `--mode=compile`.

An FSDP train step equals the data-parallel one in test_train.py; a checkpoint restored on another mesh and
process count is in test_multiprocess.py."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from absl import app

from eomt_jax import compile_report, gpu_targets
from eomt_jax import mesh as mesh_lib
from eomt_jax.main import check_flags
from eomt_jax.config_lib import load_config_file

REPO = Path(__file__).resolve().parents[1]


def _config(mesh, **overrides):
    config = load_config_file(str(REPO / "configs" / "coco_panoptic_large.py") + ":runlocal")
    config.total_steps = 4
    config.log_every_steps = 1
    config.checkpoint_every_steps = 100
    config.eval_every_steps = 100
    config.mesh = mesh
    for k, v in overrides.items():
        target, *rest = k.split(".")
        if rest:
            config[target][rest[0]] = v
        else:
            config[k] = v
    return config


def test_fsdp_rules_shard_large_leaves_and_replicate_small_ones():
    mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 4)])
    tree = {
        "params": {"blocks": {"0": {"mlp": {"kernel": jax.ShapeDtypeStruct((64, 256), np.float32)},
                                    "norm": {"scale": jax.ShapeDtypeStruct((64,), np.float32)}}},
                   "odd": jax.ShapeDtypeStruct((3, 1001), np.float32)},
        "step": jax.ShapeDtypeStruct((), np.int32),
    }
    shardings = mesh_lib.state_shardings(tree, mesh, min_size=1024)
    assert shardings["params"]["blocks"]["0"]["mlp"]["kernel"].spec == P(None, "fsdp")  # largest divisible axis
    assert shardings["params"]["blocks"]["0"]["norm"]["scale"].spec == P()  # below min_size
    assert shardings["params"]["odd"].spec == P()  # no axis divisible by 4
    assert shardings["step"].spec == P()
    only_kernels = mesh_lib.state_shardings(tree, mesh, rules=((r"norm", "replicate"), (r".*", "fsdp")), min_size=1)
    assert only_kernels["params"]["blocks"]["0"]["norm"]["scale"].spec == P()
    assert only_kernels["params"]["blocks"]["0"]["mlp"]["kernel"].spec == P(None, "fsdp")


def test_compile_mode_reports_memory_and_flops_without_data_or_state(tmp_path):
    config = _config([("data", 4), ("fsdp", 2)], **{"sharding.min_size": 4096})
    config.data.generate = ""  # compile mode must not need a dataset...
    config.data.root = ""
    # The on-device matcher: its program is one that JAX's compilation cache keeps (a host callback, as the
    # default matcher has, makes every compilation new); the report does not depend on the matcher.
    config.loss.matcher = "optax"
    report = compile_report.run(config, tmp_path)
    assert report["devices"] == 8
    assert report["flops"] > 0 and report["temporaries_bytes"] > 0 and report["arguments_bytes"] > 0
    assert report["total_bytes"] >= report["temporaries_bytes"]
    assert report["fits"] and report["saved_activations_bytes"] > 0
    assert json.loads((tmp_path / "compile_report.json").read_text()) == report
    inference = report["inference"]  # the network alone, one image per device
    assert inference["devices"] == 8 and inference["fits"] and 0 < inference["total_bytes"] < report["total_bytes"]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()  # ...nor train


def test_target_topology_is_for_compile_mode_and_names_what_it_needs(tmp_path):
    with pytest.raises(app.UsageError, match="only applies to --mode=compile"):
        check_flags("train", "tpu:v5e:2x2")
    with pytest.raises(ValueError, match="tpu:<chip>:<shape>"):
        mesh_lib.topology_devices("v5e-16")
    if importlib.util.find_spec("libtpu") is None:
        # The CI machine: no TPU compiler, and the error says how to get one.
        with pytest.raises(RuntimeError, match=r"\.\[tpu\]"):
            mesh_lib.topology_devices("tpu:v5e:2x2")
    else:
        devices = mesh_lib.topology_devices("tpu:v4:2x2x1")
        assert len(devices) == 4 and devices[0].platform == "tpu"  # megacore: one device per v4 chip


def test_compile_report_says_when_the_step_does_not_fit(tmp_path, caplog):
    """An accelerator compiler that runs out of device memory answers the compile mode's question: no fit."""

    class TooBig:
        def lower(self, *args):
            return self

        def compile(self, compiler_options=None):
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, 18.40G > 15.75G")

    replicated = mesh_lib.replicated(mesh_lib.make_mesh([("data", -1)]))
    state = {"w": jax.ShapeDtypeStruct((4,), np.float32, sharding=replicated)}
    report = {}
    assert compile_report.compile_and_report(TooBig(), state, {}, report, activations=123) is None
    assert report["fits"] is False and "18.40G" in report["error"] and report["saved_activations_bytes"] == 123
    assert "does not fit" in caplog.text
    with pytest.raises(jax.errors.JaxRuntimeError):  # a training run re-raises it
        compile_report.compile_and_report(TooBig(), state, {})


def test_gpu_targets_name_a_described_model_and_a_device_count(tmp_path):
    assert mesh_lib.parse_gpu_topology("gpu:h100:4") == ("h100", 1, 4)
    assert mesh_lib.parse_gpu_topology("gpu:A100:2x8") == ("a100", 2, 8)  # 2 hosts of 8
    for bad in ("gpu:h100", "gpu:h100:0", "gpu:h100:4x", "gpu:h100:2x2x2", "gpu::4"):
        with pytest.raises(ValueError):
            mesh_lib.topology_devices(bad)
    with pytest.raises(ValueError, match="known: a100, h100, h200"):
        mesh_lib.parse_gpu_topology("gpu:v100:1")
    for model, text in gpu_targets.GPU_TARGETS.items():
        # XLA's descriptions, less the field jaxlib 0.10's proto refuses.
        assert "collective_memory_granularity" not in text
        assert f'device_description_str: "NVIDIA {model.upper()}' in text
    if not mesh_lib._cuda_plugin_installed():
        # The CI machine: no CUDA plugin, and the error says how to get one.
        with pytest.raises(RuntimeError, match=r"\.\[cuda\]"):
            mesh_lib.topology_devices("gpu:h100:4")


def test_compile_report_lists_fused_attention_kernels_and_avoids_host_callbacks_for_absent_gpus():
    class Compiled:  # the optimized HLO of a GPU program, in part
        def as_text(self):
            call = 'custom-call(...), custom_call_target="__cudnn${}", backend_config={{}}\n'
            return 2 * call.format("fmhaSoftmax") + call.format("fmhaScaleBiasSoftmaxBackward") + "fusion(...)"

    assert compile_report.attention_kernels(Compiled()) == {
        "cudnn fmhaScaleBiasSoftmaxBackward": 1, "cudnn fmhaSoftmax": 2}
    config = _config([("data", -1)])
    assert config.loss.matcher == "scipy"
    assert compile_report._without_host_callbacks(config).loss.matcher == "optax"
    assert config.loss.matcher == "scipy"  # the caller's config is left alone


def test_absent_gpu_compile_falls_back_to_cublas_where_untuned_triton_tiling_fails():
    class Lowered:
        def __init__(self):
            self.options = []

        def compile(self, compiler_options=None):
            self.options.append(compiler_options)
            if (compiler_options or {}).get("xla_gpu_enable_triton_gemm", True):
                raise jax.errors.JaxRuntimeError("INTERNAL: Couldn't find output tile sizes that satisfy hlo: dot")
            return "compiled"

    lowered, figures = Lowered(), {}
    assert compile_report._compile(lowered, compile_report.DEVICELESS_GPU_OPTIONS, figures) == "compiled"
    assert lowered.options[-1]["xla_gpu_enable_triton_gemm"] is False
    assert figures["compiler_options"]["xla_gpu_enable_cub_radix_sort"] is False
    with pytest.raises(jax.errors.JaxRuntimeError):  # local compiles (no options) never change their options
        compile_report._compile(Lowered(), None, {})
