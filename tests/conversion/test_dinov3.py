"""DINOv3 conversion: every zoo architecture maps completely from the delta and the Hugging Face forms, the delta
files merge with their base (Hugging Face or Meta spelling), DINOv3 backbones start a fresh EoMT, and every kind of
bad input fails clearly, naming keys as the file does and writing nothing."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (
    DINOv3ViTConfig,
    DINOv3ViTModel,
    EomtDinov3Config,
    EomtDinov3ForUniversalSegmentation,
)

from eomt_jax import pretrained
from eomt_jax.conversion import dinov3, expected_shapes, infer_config, official_to_flat
from eomt_jax.conversion.cli import main as convert_main
from eomt_jax.conversion.formats import BB, detect_format
from eomt_jax.models.eomt import preset
from tests.models import oracle, oracle_dinov3

# (delta repository, size, image, queries, classes, spelling of the base) of every DINOv3 zoo checkpoint.
ZOO = [
    ("coco_panoptic_eomt_small_640_dinov3", "S", 640, 200, 133, "hub"),
    ("coco_panoptic_eomt_base_640_dinov3", "B", 640, 200, 133, "meta"),
    ("coco_panoptic_eomt_large_640_dinov3", "L", 640, 200, 133, "hub"),
    ("coco_panoptic_eomt_large_1280_dinov3", "L", 1280, 200, 133, "meta"),
    ("ade_semantic_eomt_large_512_dinov3", "L", 512, 100, 150, "hub"),
    ("coco_instance_eomt_large_640_dinov3", "L", 640, 200, 80, "meta"),
    ("coco_instance_eomt_large_1280_dinov3", "L", 1280, 200, 80, "hub"),
]
_DIMS = {"S": (384, 12, 6, 3), "B": (768, 12, 12, 3), "L": (1024, 24, 16, 4)}
# Parameters of the COCO panoptic models (buffers excluded), counted on the transformers models.
_PARAMS = {"S": 23_356_934, "B": 92_425_094, "L": 315_032_710}


def _zeros(sd):
    # Zero-stride arrays: full shapes at no memory cost, enough for the key and shape logic. Real (non-meta)
    # tensors such as the pixel statistics keep their values.
    return {k: v.numpy() if v.device.type != "meta" else np.broadcast_to(np.float32(0), tuple(v.shape))
            for k, v in sd.items()}


@pytest.mark.parametrize("zoo,size,image,queries,classes,base_form", ZOO)
def test_zoo_architectures_map_completely(zoo, size, image, queries, classes, base_form):
    dim, depth, heads, k = _DIMS[size]
    cfg = EomtDinov3Config(
        hidden_size=dim, num_hidden_layers=depth, num_attention_heads=heads, intermediate_size=4 * dim,
        num_blocks=k, num_queries=queries, image_size=image, patch_size=16, num_register_tokens=4,
        num_labels=classes, layer_norm_eps=1e-5,
    )
    with torch.device("meta"):
        model = EomtDinov3ForUniversalSegmentation(cfg)
    want = preset(size, backbone="dinov3", num_classes=classes, num_queries=queries, image_size=image)
    expected = expected_shapes(want)
    if classes == 133:  # the fused qkv bias also holds the (always zero) key bias: D more per block
        count = sum(int(np.prod(s)) for p, s in expected.items() if p != "attn_mask_probs")
        assert count == _PARAMS[size] + depth * dim

    # Hugging Face directory: the architecture from the weights and config.json.
    hf = _zeros(model.state_dict())
    assert detect_format(hf, cfg.to_dict()) == detect_format(hf) == "hf_eomt_dinov3"
    sd, name = dinov3.hf_eomt_to_dinov3(hf)
    sd, name, missing = dinov3.dinov3_to_official(sd, name)
    assert not missing
    assert infer_config(sd, cfg.to_dict(), backbone="dinov3") == want
    assert set(official_to_flat(sd, expected, name)) == set(expected)

    # Delta file + base: the base's backbone pairs with the delta's key by key, and the image size comes from
    # the zoo name in the path.
    delta = _zeros(oracle_dinov3.official_state_dict(model))
    assert detect_format(delta) == "official_dinov3"
    backbone = {k: v for k, v in oracle_dinov3.official_state_dict(model).items() if k.startswith(BB)}
    base = oracle_dinov3.hub_backbone(backbone) if base_form == "hub" else oracle_dinov3.meta_backbone(model, backbone)
    base = _zeros(base)
    assert detect_format(base) == {"hub": "hf_dinov3", "meta": "meta_dinov3"}[base_form]
    base_v3, _ = dinov3.backbone_to_dinov3(base, detect_format(base))
    assert {k: v.shape for k, v in base_v3.items()} == {k: v.shape for k, v in delta.items() if k.startswith(BB)}
    sd, name, missing = dinov3.dinov3_to_official(delta)
    assert not missing
    size_from_name = dinov3.zoo_image_size(f"/hub/models--tue-mps--{zoo}/snapshots/0/pytorch_model.bin")
    assert size_from_name == image
    assert infer_config(sd, backbone="dinov3", defaults={"image_size": size_from_name}) == want
    assert set(official_to_flat(sd, expected, name)) == set(expected)


def test_formats_are_told_apart():
    """Each DINOv3 form is recognised, and none is mistaken for its DINOv2 counterpart (or the reverse)."""
    v2 = oracle.build(depth=2, num_blocks=1)
    v3 = oracle_dinov3.build(depth=2, num_blocks=1)
    assert detect_format(v2.state_dict()) == "hf_eomt"
    assert detect_format(oracle.official_state_dict(v2)) == "official"
    assert detect_format(v3.state_dict()) == "hf_eomt_dinov3"
    assert detect_format(oracle_dinov3.official_state_dict(v3)) == "official_dinov3"
    # The model type of config.json decides when given.
    assert detect_format(v3.state_dict(), {"model_type": "eomt_dinov3"}) == "hf_eomt_dinov3"
    backbone = oracle_dinov3.pretrained_backbone(v3)
    hub = oracle_dinov3.hub_backbone(backbone)
    assert detect_format(hub) == "hf_dinov3"
    assert detect_format({"model." + k if k.startswith("layer.") else k: v for k, v in hub.items()}) == "hf_dinov3"
    assert detect_format(oracle_dinov3.meta_backbone(v3, backbone)) == "meta_dinov3"
    assert detect_format(["cls_token", "reg_token", "pos_embed", "blocks.0.attn.qkv.weight"]) == "timm_dinov2"
    assert detect_format(["embeddings.cls_token", "encoder.layer.0.norm1.weight"]) == "hf_dinov2"


@pytest.fixture(scope="module")
def tiny():
    model = oracle_dinov3.build()
    base = oracle_dinov3.pretrained_backbone(model)
    return model, base, oracle_dinov3.delta_state_dict(model, base)


def _run(args):
    return convert_main([str(a) for a in args])


def _write(directory, model, base, delta, base_form="hub", drop_from_base=()):
    """A delta file and its base (Hugging Face hub or Meta spelling, less the keys `drop_from_base`)."""
    directory.mkdir(parents=True)
    torch.save(delta, directory / "pytorch_model.bin")
    if base_form == "hub":
        from safetensors.torch import save_file

        sd = oracle_dinov3.hub_backbone(base)
        base_path = directory / "base" / "model.safetensors"
        base_path.parent.mkdir()
        save_file({k: v.contiguous() for k, v in sd.items() if k not in drop_from_base}, str(base_path))
    else:
        sd = oracle_dinov3.meta_backbone(model, base)
        base_path = directory / "base.pth"
        torch.save({k: v for k, v in sd.items() if k not in drop_from_base}, base_path)
    return directory / "pytorch_model.bin", base_path


def _assert_nothing_written(dst):
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")], "temporary output left"


@pytest.mark.parametrize("base_form", ["hub", "meta"])
def test_delta_and_base_rebuild_the_fine_tuned_model(tiny, tmp_path, base_form):
    """Backbone = base + delta, heads as stored, probabilities 1 + stored clipped to [0, 1], image size from the
    zoo name; the checkpoint rebuilds a DINOv3 network."""
    model, base, delta = tiny
    delta = dict(delta, **{"network.attn_mask_probs": torch.tensor([-0.75, 0.5])})
    src, base_path = _write(tmp_path / "coco_panoptic_eomt_small_640_dinov3", model, base, delta, base_form)
    dst = tmp_path / "out"
    assert _run(["--src", src, "--base", base_path, "--dst", dst, "--set", "num_heads=2"]) == 0
    meta = pretrained.read_metadata(dst)
    assert meta["source_format"] == "official_dinov3" and meta["base"] == str(base_path)
    net = pretrained.load(dst)
    assert net.config.backbone == "dinov3" and net.config.image_size == (640, 640)
    assert net.config.layer_norm_eps == 1e-5 and not hasattr(net.backbone, "pos_embed")
    np.testing.assert_allclose(np.asarray(net.attn_mask_probs[...]), [0.25, 1.0])
    full = oracle_dinov3.official_state_dict(model)
    block = BB + "blocks.1.attention."
    qkv = torch.cat([full[block + f"{p}_proj.weight"] for p in "qkv"]).numpy().T
    np.testing.assert_allclose(np.asarray(net.backbone.blocks[1].attn.qkv.kernel[...]), qkv, atol=1e-6)
    bias = np.asarray(net.backbone.blocks[1].attn.qkv.bias[...])
    np.testing.assert_array_equal(bias[64:128], 0.0)  # no key bias, whatever Meta's masked third held
    np.testing.assert_allclose(bias[:64], full[block + "q_proj.bias"].numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(net.backbone.reg_token[...]),
                               full[BB + "patch_embed.register_tokens"].numpy(), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(net.class_head.kernel[...]), full["network.class_head.weight"].numpy().T)


def test_delta_without_base_names_the_base_it_needs(tiny, tmp_path, capsys):
    model, base, delta = tiny
    src, _ = _write(tmp_path / "coco_panoptic_eomt_large_640_dinov3", model, base, delta)
    dst = tmp_path / "out"
    assert _run(["--src", src, "--dst", dst, "--set", "num_heads=2"]) == 1
    err = capsys.readouterr().err
    assert "--base" in err and "facebook/dinov3-vitl16-pretrain-lvd1689m" in err
    assert "coco_panoptic_eomt_small_640_dinov3" in err  # the zoo names are given as examples
    _assert_nothing_written(dst)
    # Without a zoo name in the path the width decides.
    small = {BB + "patch_embed.cls_token": torch.zeros(1, 1, 384),
             BB + "patch_embed.patch_embeddings.weight": torch.zeros(384, 3, 16, 16)}
    torch.save(small, tmp_path / "delta.bin")
    assert _run(["--src", tmp_path / "delta.bin", "--dst", dst]) == 1
    assert "facebook/dinov3-vits16-pretrain-lvd1689m" in capsys.readouterr().err


def test_base_of_another_size_is_refused(tiny, tmp_path, capsys):
    delta = tiny[2]
    shallow = oracle_dinov3.build(depth=3, num_blocks=1)
    base = oracle_dinov3.pretrained_backbone(shallow)
    src, base_path = _write(tmp_path / "d", shallow, base, delta)
    dst = tmp_path / "out"
    assert _run(["--src", src, "--base", base_path, "--dst", dst, "--set", "num_heads=2",
                 "--set", "image_size=64"]) == 1
    err = capsys.readouterr().err
    assert "width 64 with 3 blocks" in err and "width 64 with 4 blocks" in err
    _assert_nothing_written(dst)


def test_missing_keys_are_named_as_each_file_names_them(tiny, tmp_path, capsys):
    """Delta and base problems come in one report, each key in its own file's naming."""
    model, base, delta = tiny
    delta = {k: v for k, v in delta.items()
             if k not in (BB + "blocks.1.norm2.bias", BB + "blocks.2.attention.k_proj.weight",
                          "network.mask_head.2.bias")}
    delta["network.class_head.bias"] = torch.zeros(99)
    src, base_path = _write(tmp_path / "hub", model, base, delta, "hub", ["layer.3.mlp.up_proj.weight"])
    dst = tmp_path / "out"
    assert _run(["--src", src, "--base", base_path, "--dst", dst, "--set", "num_heads=2",
                 "--set", "image_size=64"]) == 1
    err = capsys.readouterr().err
    assert f"{BB}blocks.1.norm2.bias (backbone/blocks/1/norm2/bias)" in err
    assert f"{BB}blocks.2.attention.k_proj.weight" in err
    assert "network.mask_head.2.bias (mask_head/fc2/bias)" in err
    assert "network.class_head.bias" in err and "(99,)" in err
    assert f"the base lacks layer.3.mlp.up_proj.weight (the delta has {BB}blocks.3.mlp.up_proj.weight)" in err
    _assert_nothing_written(dst)
    # Meta's fused qkv is named as Meta stores it.
    _, base, delta = tiny
    src, base_path = _write(tmp_path / "meta", model, base, delta, "meta",
                            ["blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight"])
    assert _run(["--src", src, "--base", base_path, "--dst", dst, "--set", "num_heads=2",
                 "--set", "image_size=64"]) == 1
    err = capsys.readouterr().err
    fused = f"{BB}blocks.0.attention.{{k,q,v}}_proj.weight"
    assert f"the base lacks blocks.0.attn.qkv.weight (the delta has {fused})" in err
    assert "the base lacks blocks.0.attn.proj.weight" in err
    _assert_nothing_written(dst)


def test_hugging_face_keys_are_named_in_hugging_face_naming(tiny, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    model = tiny[0]
    src = oracle_dinov3.save_hf(model, tmp_path / "hf")
    sd = load_file(str(src / "model.safetensors"))
    del sd["layers.2.attention.k_proj.weight"], sd["mask_head.fc2.bias"]
    sd["layers.0.attention.k_proj.bias"] = torch.zeros(64)  # a key bias DINOv3 does not have
    sd["class_predictor.bias"] = torch.zeros(99)
    save_file(sd, str(src / "model.safetensors"))
    dst = tmp_path / "out"
    assert _run(["--src", src, "--dst", dst, "--set", "num_heads=2"]) == 1
    err = capsys.readouterr().err
    assert "layers.2.attention.k_proj.weight" in err and "mask_head.fc2.bias (mask_head/fc2/bias)" in err
    assert "unexpected key(s): layers.0.attention.k_proj.bias" in err
    assert "class_predictor.bias: shape (99,)" in err
    assert "network." not in err
    _assert_nothing_written(dst)


def test_image_size_is_required(tiny, tmp_path, capsys):
    model, base, delta = tiny
    src, base_path = _write(tmp_path / "my_model", model, base, delta)
    dst = tmp_path / "out"
    assert _run(["--src", src, "--base", base_path, "--dst", dst, "--set", "num_heads=2"]) == 1
    err = capsys.readouterr().err
    assert "image size" in err and "image_size" in err and "_dinov3" in err
    _assert_nothing_written(dst)
    assert _run(["--src", src, "--base", base_path, "--dst", dst, "--set", "num_heads=2",
                 "--set", "image_size=(64, 48)"]) == 0
    assert pretrained.load(dst).config.image_size == (64, 48)


def test_config_file_must_be_a_dinov3_one(tiny, tmp_path, capsys):
    model, base, delta = tiny
    src, base_path = _write(tmp_path / "d", model, base, delta)
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.model = dict(backbone=arg or 'dinov3', num_heads=2, image_size=(64, 32), layer_norm_eps=1e-5)\n"
        "    return c\n"
    )
    dst = tmp_path / "out"
    assert _run(["--src", src, "--base", base_path, "--dst", dst, "--config", f"{cfg}:dinov2"]) == 1
    assert "backbone: the weights say 'dinov3' but the configuration says 'dinov2'" in capsys.readouterr().err
    _assert_nothing_written(dst)
    assert _run(["--src", src, "--base", base_path, "--dst", dst, "--config", str(cfg)]) == 0
    assert pretrained.load(dst).config.image_size == (64, 32)
    # --base belongs to delta files only.
    hf = oracle_dinov3.save_hf(model, tmp_path / "hf")
    assert _run(["--src", hf, "--base", base_path, "--dst", tmp_path / "o2"]) == 1
    assert "--base is for the DINOv3 model zoo's delta files" in capsys.readouterr().err


def _dinov3_backbone(gated: bool, registers: int = 4):
    torch.manual_seed(0)
    cfg = DINOv3ViTConfig(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96 if gated else 128,
        num_register_tokens=registers, patch_size=16, image_size=64, layer_norm_eps=1e-5, use_gated_mlp=gated,
        hidden_act="silu" if gated else "gelu",
    )
    model = DINOv3ViTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("form", ["hub", "meta"])
def test_dinov3_backbone_starts_an_eomt(tmp_path, form):
    """A DINOv3 backbone under a fresh head: its tokens are those of transformers' DINOv3ViTModel (Meta's
    spelling: a gated MLP, no registers)."""
    gated = form == "meta"
    model = _dinov3_backbone(gated, registers=0 if gated else 4)
    backbone = {BB + re.sub(r"^embeddings\.", "patch_embed.", re.sub(r"^model\.layer\.", "blocks.", k)): v
                for k, v in model.state_dict().items() if k != "embeddings.mask_token"}
    if form == "hub":
        model.save_pretrained(str(tmp_path / "src"))
        src = tmp_path / "src"
    else:
        src = tmp_path / "dinov3_vits16_pretrain.pth"
        torch.save(oracle_dinov3.meta_backbone(model, backbone), src)
    dst = tmp_path / "init"
    args = ["--src", src, "--dst", dst, "--set", "num_heads=4", "--set", "num_classes=3", "--set", "num_queries=4",
            "--set", "num_blocks=1", "--set", "image_size=(64, 48)"]
    assert _run(args) == 0
    net = pretrained.load(dst)
    assert net.config.backbone == "dinov3" and net.config.mlp_type == ("swiglu" if gated else "gelu")
    assert net.config.num_classes == 3 and net.config.num_registers == (0 if gated else 4)
    images = np.random.default_rng(0).uniform(0, 1, (2, 64, 48, 3)).astype(np.float32)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = ((images - mean) / std).astype(np.float32)

    @nnx.jit
    def encode(backbone, x):
        tokens = backbone.embed(x)
        rope = backbone.rope((4, 3))
        for block in backbone.blocks:
            tokens = block(tokens, None, rope)
        return backbone.norm(tokens)

    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(encode(net.backbone, x)), ref, atol=1e-4, rtol=0)


def test_dinov3_backbone_needs_the_head_settings(tmp_path, capsys):
    model = _dinov3_backbone(False)
    model.save_pretrained(str(tmp_path / "src"))
    dst = tmp_path / "init"
    assert _run(["--src", tmp_path / "src", "--dst", dst, "--set", "num_classes=3"]) == 1
    err = capsys.readouterr().err
    assert "a DINOv3 backbone carries no EoMT head" in err and "num_queries" in err and "image_size" in err
    _assert_nothing_written(dst)


def test_zoo_names_in_paths():
    assert dinov3.zoo_image_size("/x/coco_instance_eomt_large_1280_dinov3/pytorch_model.bin") == 1280
    assert dinov3.zoo_image_size("/x/models--tue-mps--ade20k_semantic_eomt_large_512_dinov3/snap/a.bin") == 512
    assert dinov3.zoo_image_size("/x/coco_panoptic_eomt_large_640/pytorch_model.bin") is None  # DINOv2's name
