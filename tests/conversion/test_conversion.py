"""Converter behaviour: every model-zoo architecture maps completely, and every kind of bad input fails clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import EomtConfig, EomtForUniversalSegmentation

from eomt_jax import pretrained
from eomt_jax.conversion import expected_shapes, hf_eomt_to_official, infer_config, official_to_flat
from eomt_jax.conversion.cli import main as convert_main
from tests.models import oracle

REPO = Path(__file__).resolve().parents[2]

# (size, image, queries, classes) of every published DINOv2 EoMT checkpoint.
ZOO = [
    ("S", 640, 200, 133),
    ("B", 640, 200, 133),
    ("L", 640, 200, 133),
    ("L", 1280, 200, 133),
    ("g", 640, 200, 133),
    ("g", 1280, 200, 133),
    ("L", 640, 200, 80),
    ("L", 1280, 200, 80),
    ("L", 640, 200, 150),
    ("g", 1280, 200, 150),
    ("L", 512, 100, 150),
    ("L", 1024, 100, 19),
]
_DIMS = {"S": (384, 12, 6, 3), "B": (768, 12, 12, 3), "L": (1024, 24, 16, 4), "g": (1536, 40, 24, 5)}


def _meta_hf_state(size, image, queries, classes):
    """Shapes of a real-size Hugging Face EoMT state dict, without allocating it (meta device)."""
    dim, depth, heads, k = _DIMS[size]
    cfg = EomtConfig(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, num_blocks=k, num_queries=queries,
        image_size=image, patch_size=16, num_register_tokens=4, num_labels=classes, use_swiglu_ffn=size == "g",
        layerscale_value=1e-5,
    )
    with torch.device("meta"):
        model = EomtForUniversalSegmentation(cfg)
    return model


def _as_zero_arrays(sd):
    # Zero-stride arrays: full shapes at no memory cost, enough to exercise the key and shape logic.
    # Real (non-meta) tensors such as the pixel statistics keep their values.
    return {
        k: v.numpy() if v.device.type != "meta" else np.broadcast_to(np.float32(0), tuple(v.shape))
        for k, v in sd.items()
    }


@pytest.mark.parametrize("size,image,queries,classes", ZOO)
def test_zoo_architectures_map_completely(size, image, queries, classes):
    model = _meta_hf_state(size, image, queries, classes)
    official = _as_zero_arrays(oracle.official_state_dict(model))
    hf = _as_zero_arrays(model.state_dict())
    dim, depth, heads, k = _DIMS[size]
    sds = (official, hf_eomt_to_official(hf))
    cfg = infer_config(official)
    assert infer_config(sds[1]) == cfg  # both formats: the same architecture, so one set of expected shapes
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_blocks) == (dim, depth, heads, k)
    assert cfg.image_size == (image, image) and cfg.num_queries == queries and cfg.num_classes == classes
    assert cfg.mlp_type == ("swiglu" if size == "g" else "gelu")
    assert cfg.mlp_hidden == (8192 if size == "g" else 4 * dim)
    expected = expected_shapes(cfg)
    for sd in sds:
        assert set(official_to_flat(sd, expected)) == set(expected)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    model = oracle.build()
    sd = oracle.official_state_dict(model)
    return model, sd, tmp


def _run(args):
    return convert_main([str(a) for a in args])


def _save(sd, path):
    torch.save(sd, str(path))
    return path


def test_missing_extra_and_misshaped_keys_are_all_reported(tiny, tmp_path, capsys):
    _, sd, _ = tiny
    bad = dict(sd)
    del bad["network.mask_head.2.bias"]
    bad["network.some_new_head.weight"] = torch.zeros(3)
    bad["network.class_head.bias"] = torch.zeros(99)
    src = _save(bad, tmp_path / "bad.bin")
    dst = tmp_path / "out"
    assert _run(["--src", src, "--dst", dst, "--set", "num_heads=2"]) == 1
    err = capsys.readouterr().err
    assert "network.some_new_head.weight" in err
    assert "network.mask_head.2.bias (mask_head/fc2/bias)" in err  # the source's name, then the Flax path
    assert "network.class_head.bias" in err and "(99,)" in err
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")], "temporary output left behind"


def test_hugging_face_keys_are_named_in_hugging_face_naming(tiny, tmp_path, capsys):
    """Every problem of a Hugging Face checkpoint names the key as that checkpoint does (the Flax path follows
    a missing key in brackets), not by the official or the Flax name."""
    model = tiny[0]
    src = oracle.save_hf(model, tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src / "model.safetensors"))
    del sd["mask_head.fc2.bias"]
    sd["class_predictor.bias"] = torch.zeros(99)
    save_file(sd, str(src / "model.safetensors"))
    assert _run(["--src", src, "--dst", tmp_path / "out"]) == 1
    err = capsys.readouterr().err
    assert "missing key(s): mask_head.fc2.bias (mask_head/fc2/bias)" in err
    assert "class_predictor.bias: shape (99,)" in err
    assert "network." not in err


def test_missing_key_alone(tiny, tmp_path, capsys):
    _, sd, _ = tiny
    bad = {k: v for k, v in sd.items() if k != "network.upscale.1.conv2.weight"}
    assert _run(["--src", _save(bad, tmp_path / "m.bin"), "--dst", tmp_path / "o", "--set", "num_heads=2"]) == 1
    assert "missing key(s): network.upscale.1.conv2.weight (upscale/1/conv2/kernel)" in capsys.readouterr().err


def test_wrong_shape_alone(tiny, tmp_path, capsys):
    _, sd, _ = tiny
    bad = dict(sd)
    bad["network.encoder.backbone.blocks.1.attn.proj.weight"] = torch.zeros(64, 32)
    assert _run(["--src", _save(bad, tmp_path / "m.bin"), "--dst", tmp_path / "o", "--set", "num_heads=2"]) == 1
    err = capsys.readouterr().err
    assert "blocks.1.attn.proj.weight" in err and "expected (64, 64)" in err


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_truncated_file(tiny, tmp_path, capsys, suffix):
    model, sd, _ = tiny
    if suffix == ".bin":
        src = _save(sd, tmp_path / "m.bin")
    else:
        src = oracle.save_hf(model, tmp_path / "hf") / "model.safetensors"
    data = src.read_bytes()
    src.write_bytes(data[: len(data) // 2])
    dst = tmp_path / "o"
    assert _run(["--src", src, "--dst", dst, "--set", "num_heads=2"]) == 1
    err = capsys.readouterr().err
    assert str(src) in err and "cannot" in err
    assert not dst.exists()


def test_missing_source_and_existing_destination(tiny, tmp_path, capsys):
    _, sd, _ = tiny
    assert _run(["--src", tmp_path / "nope.bin", "--dst", tmp_path / "o"]) == 1
    assert "nope.bin: no such file" in capsys.readouterr().err
    src = _save(sd, tmp_path / "m.bin")
    (tmp_path / "taken").mkdir()
    assert _run(["--src", src, "--dst", tmp_path / "taken", "--set", "num_heads=2"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_config_cross_check_and_unknown_override(tiny, tmp_path, capsys):
    _, sd, _ = tiny
    src = _save(sd, tmp_path / "m.bin")
    assert _run(["--src", src, "--dst", tmp_path / "o", "--set", "num_queries=11"]) == 1
    assert "num_queries: the weights say 10" in capsys.readouterr().err
    assert _run(["--src", src, "--dst", tmp_path / "o", "--set", "num_querys=10"]) == 1
    assert "unknown model field" in capsys.readouterr().err
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.model = dict(num_heads=2, num_classes=int(arg or 5))\n"
        "    return c\n"
    )
    assert _run(["--src", src, "--dst", tmp_path / "o", "--config", f"{cfg}:7"]) == 1
    assert "num_classes: the weights say 5" in capsys.readouterr().err
    assert _run(["--src", src, "--dst", tmp_path / "o", "--config", str(cfg)]) == 0


def test_lightning_wrapper_and_bfloat16(tiny, tmp_path):
    model, sd, _ = tiny
    sd = dict(sd, **{"criterion.empty_weight": torch.ones(6)})
    src = _save({"state_dict": sd}, tmp_path / "ckpt.bin")
    dst = tmp_path / "bf16"
    assert _run(["--src", src, "--dst", dst, "--set", "num_heads=2", "--dtype", "bfloat16"]) == 0
    net = pretrained.load(dst)
    assert net.class_head.kernel[...].dtype == np.dtype("bfloat16")
    images = np.random.default_rng(1).uniform(0, 1, (1, 64, 64, 3)).astype(np.float32)
    ref, _ = oracle.run(model, images, probs=0.0, capture=False)
    masks, _ = net(images)
    # bf16 weights carry ~3 significant digits; relative to the logits' spread that is a few percent at most.
    err = np.abs(np.asarray(masks[0], np.float32) - ref[-1]).max() / np.abs(ref[-1]).max()
    assert err < 0.05


def test_command_line_script(tiny, tmp_path):
    model, _, _ = tiny
    src = oracle.save_hf(model, tmp_path / "hf")
    dst = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, str(REPO / "convert" / "torch_to_flax.py"), "--src", str(src), "--dst", str(dst)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert (dst / "eomt_config.json").exists() and (dst / "params").is_dir()
    assert pretrained.read_metadata(dst)["source_format"] == "hf_eomt"


def test_non_finite_weights_and_a_file_as_destination_are_refused(tmp_path, capsys):
    from eomt_jax.conversion.cli import main as convert_main
    from tests.models import oracle

    model = oracle.build(hidden_size=64, depth=2, heads=2, num_blocks=1, queries=8, labels=5)
    with torch.no_grad():
        model.query.weight[0, 0] = float("nan")
        model.class_predictor.bias[1] = float("inf")
    src = oracle.save_hf(model, tmp_path / "hf")
    assert convert_main(["--src", str(src), "--dst", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "2 tensor(s) hold NaN or infinite values" in err and "query.weight" in err
    assert "class_predictor.bias" in err and not (tmp_path / "out").exists()

    (tmp_path / "file").write_text("x")
    assert convert_main(["--src", str(src), "--dst", str(tmp_path / "file"), "--overwrite"]) == 1
    assert "is a file; the output is a directory" in capsys.readouterr().err
