"""Benchmark CLI smoke test on a tiny architecture (timings are not asserted: tests don't time things)."""

import json
from pathlib import Path

import pytest

from eomt_jax import benchmark

TINY = """
import ml_collections
def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = dict(embed_dim=64, depth=3, num_heads=2, patch_size=16, image_size=(64, 64), num_registers=4,
                   mlp_type="gelu", mlp_hidden=128, num_queries=5, num_classes=3, num_blocks=2)
    return c
"""


def test_inference_benchmark_with_torch_comparison(tmp_path, capsys):
    cfg = tmp_path / "tiny.py"
    cfg.write_text(TINY)
    report = benchmark.main(["--config", str(cfg), "--steps", "2", "--warmup", "1", "--batch-size", "2",
                             "--compare-torch", "--no-torch-compile"])
    out = capsys.readouterr().out
    assert "jax / torch throughput" in out
    assert json.loads(out.strip().splitlines()[-1])["config"]["batch_size"] == 2
    assert report["jax"]["images_per_s"] > 0 and report["jax"]["flops_per_step"] > 0
    # The PyTorch side ran the same weights: its output agrees with ours.
    assert report["torch"]["max_abs_diff"] < 1e-3


def test_inference_benchmark_bf16_fused(tmp_path, capsys):
    cfg = tmp_path / "tiny.py"
    cfg.write_text(TINY)
    report = benchmark.main(["--config", str(cfg), "--steps", "1", "--warmup", "0", "--dtype", "bfloat16",
                             "--attention", "fused", "--compare-torch", "--no-torch-compile"])
    assert report["config"]["dtype"] == "bfloat16" and report["jax"]["mfu"] is None  # CPU: no peak figure
    # Like for like: PyTorch multiplies in bf16 too, and still computes the same network (bf16 rounding apart:
    # a float32 PyTorch would differ by ~1e-6, far below; an unrelated network by ~1).
    assert report["torch"]["dtype"] == "bfloat16 (autocast)"
    assert 1e-4 < report["torch"]["max_abs_diff"] < 0.2


def test_train_benchmark_with_torch_comparison(capsys):
    """--mode=train times the real train step of the config (here the demo's tiny variant) over the 8 test
    devices, and the transformers EoMT's training step on the same batch."""
    report = benchmark.main(["--mode", "train", "--config", str(Path(__file__).parents[1] / "configs" / "demo_shapes.py") + ":runlocal", "--steps", "2",
                             "--warmup", "1", "--batch-size", "8", "--compare-torch", "--no-torch-compile"])
    out = capsys.readouterr().out
    assert "jax / torch throughput" in out
    assert report["mode"] == "train" and report["config"]["devices"] == 8 and report["config"]["batch_size"] == 8
    res = report["jax"]
    # Warm-up + timed steps really updated the (donated) state, and the loss is a real number.
    assert res["steps_taken"] == 3 and res["loss"] > 0 and res["flops_per_step"] > 0
    assert report["torch"]["loss"] > 0


def test_train_benchmark_size_preset():
    """Without --config, --mode=train builds the COCO panoptic experiment of --size (the step itself is timed by
    the test above; compiling a 12-block train step here would only cost time)."""
    import argparse

    args = argparse.Namespace(config=None, size="S", image_size=320, num_classes=133, num_queries=200,
                              batch_size=8, dtype="bfloat16", attention=None)
    config = benchmark.train_config(args)
    assert config.model.embed_dim == 384 and config.model.depth == 12 and config.model.image_size == (320, 320)
    assert config.data.batch_size == 8 and config.model.dtype == "bfloat16" and config.data.image_size == 320
    assert len(config.anneal.starts) == config.model.num_blocks == 3  # EoMT-S: queries in the last 3 blocks


@pytest.mark.slow
def test_gpu_suite_tiny_runs_every_part_and_writes_its_tables(tmp_path):
    """`--suite gpu --tiny`: the suite's code path at tiny sizes on the test CPUs: JAX inference (plain and fused,
    with post-processing), the train step with a profiler trace and its top operations, the PyTorch side."""
    report = benchmark.main(["--suite", "gpu", "--tiny", "--out", str(tmp_path)])
    assert not report["skipped"] and not report.get("errors")
    jax_rows = [r for r in report["inference"] if r["framework"] == "jax"]
    assert {(r["batch"], r["attention"]) for r in jax_rows} == {(2, "plain"), (2, "fused")}
    assert [r["batch"] for r in report["inference"] if r["framework"] == "torch"] == [2]
    assert all(r["with_postprocess"]["images_per_s"] > 0 for r in report["inference"])
    assert {r["framework"] for r in report["train"]} == {"jax", "torch"}
    fused, plain = (r for r in report["train"] if r["framework"] == "jax")
    assert fused["attention"] == "fused" and fused["images_per_device"] == 4
    assert plain["steps_taken"] == 3 and fused["steps_taken"] == 3 + fused["trace_steps"]  # the trace's steps ran
    ops = fused["top_ops"]
    assert ops and all(o["total_ms"] > 0 for o in ops) and sum(o["percent"] for o in ops) <= 100.01
    assert list((tmp_path / "trace").rglob("*.xplane.pb"))
    assert json.loads((tmp_path / "suite.json").read_text())["tiny"] is True
    markdown = (tmp_path / "suite.md").read_text()
    assert "| jax, fused | 2 |" in markdown and "Train step" in markdown and "Most expensive operations" in markdown
