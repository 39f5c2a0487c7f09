"""StableHLO export round trip on CPU."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax import export

from eomt_jax import pretrained
from eomt_jax.conversion.cli import main as convert_main
from eomt_jax.export import main as export_main
from tests.models import oracle


def test_export_round_trip(tmp_path):
    src = oracle.save_hf(oracle.build(), tmp_path / "hf")
    assert convert_main(["--src", str(src), "--dst", str(tmp_path / "ckpt")]) == 0
    out = tmp_path / "model.jaxexport"
    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    exported = export.deserialize(out.read_bytes())
    model = pretrained.load(tmp_path / "ckpt")
    for batch in (1, 3):  # the batch dimension is symbolic
        images = np.random.default_rng(batch).uniform(0, 1, (batch, 64, 64, 3)).astype(np.float32)
        masks, classes = exported.call(images)
        ref_masks, ref_classes = model(images)
        # Same weights; the reference runs op by op, the export as one fused program: float32 noise ~1e-6
        # relative on logits of magnitude ~10, so the parity tolerance of the converter tests applies.
        np.testing.assert_allclose(np.asarray(masks), np.asarray(ref_masks[-1]), atol=1e-4, rtol=0)
        np.testing.assert_allclose(np.asarray(classes), np.asarray(ref_classes[-1]), atol=1e-4, rtol=0)


def test_export_for_several_platforms_from_a_cpu(tmp_path):
    """One file for CPUs and accelerators, written on a machine without any accelerator; it still runs here."""
    src = oracle.save_hf(oracle.build(), tmp_path / "hf")
    assert convert_main(["--src", str(src), "--dst", str(tmp_path / "ckpt")]) == 0
    out = tmp_path / "model.jaxexport"
    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--platforms", "cpu,cuda,tpu",
                        "--dtype", "bfloat16"]) == 0
    exported = export.deserialize(out.read_bytes())
    assert exported.platforms == ("cpu", "cuda", "tpu")
    images = np.random.default_rng(0).uniform(0, 1, (2, 64, 64, 3)).astype(np.float32)
    model = pretrained.load(tmp_path / "ckpt", dtype="bfloat16")
    graphdef, state = nnx.split(model)
    ref = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x, masked_attn=False)[0][-1])(state, images)
    masks, _ = exported.call(images)
    # The CPU part of the file is the program jit compiles here for the same bf16 network.
    diff = np.abs(np.asarray(masks, np.float32) - np.asarray(ref, np.float32)).max()
    print(f"exported vs jit, max |difference| {diff}")
    assert diff == 0
    with pytest.raises(SystemExit):
        export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out), "--platforms", "cpu,gpu"])
