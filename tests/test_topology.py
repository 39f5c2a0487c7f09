"""Meshes and topologies within one process (8 fake CPU devices): FSDP sharding rules, resuming a checkpoint on
another mesh shape, and `--mode=compile`. The two-process case is in test_multiprocess.py."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from eomt_jax import mesh as mesh_lib
from eomt_jax import train
from eomt_jax.conversion import load_config_file

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


def _losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows}


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


def test_fsdp_training_equals_data_parallel_and_resumes_on_another_mesh(tmp_path):
    data = str(tmp_path / "data")
    # A: plain data parallelism over 8 devices, 4 steps without interruption.
    train.run(_config([("data", 8)], **{"data.root": data}), tmp_path / "a", "train")
    # B: 2-way data x 4-way FSDP with most kernels sharded; stops after 2 steps with a checkpoint.
    fsdp = _config([("data", 2), ("fsdp", 4)], max_steps_per_run=2, **{"data.root": data, "sharding.min_size": 4096})
    train.run(fsdp, tmp_path / "b", "train")
    # C: the same workdir resumed on a 4 x 2 mesh.
    train.run(_config([("data", 4), ("fsdp", 2)], **{"data.root": data, "sharding.min_size": 4096}),
              tmp_path / "b", "train")
    a, b = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:  # equal up to the order of float summation across devices
        np.testing.assert_allclose(b[step], a[step], rtol=1e-5, err_msg=f"step {step}")


def test_compile_mode_reports_memory_and_flops_without_data_or_state(tmp_path):
    config = _config([("data", 4), ("fsdp", 2)], **{"sharding.min_size": 4096})
    config.data.generate = ""  # compile mode must not need a dataset...
    config.data.root = ""
    report = train.run(config, tmp_path, "compile")
    assert report["devices"] == 8
    assert report["flops"] > 0 and report["temporaries_bytes"] > 0 and report["arguments_bytes"] > 0
    assert report["total_bytes"] >= report["temporaries_bytes"]
    assert json.loads((tmp_path / "compile_report.json").read_text()) == report
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()  # ...nor train
