"""StableHLO export round trip on CPU."""

import numpy as np
from jax import export

from eomt_jax import pretrained
from eomt_jax.conversion import main as convert_main
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
