"""Benchmark CLI smoke test on a tiny architecture (timings are not asserted: tests don't time things)."""

import json

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
                             "--attention", "fused"])
    assert report["config"]["dtype"] == "bfloat16" and report["jax"]["mfu"] is None  # CPU: no peak figure
