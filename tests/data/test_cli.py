import re

from eomt_jax.data import load_source, synthetic, throughput


def test_generate_by_kind(tmp_path):
    truth = synthetic.generate("cityscapes", tmp_path, num_train=2, num_val=2, size=32)
    assert len(load_source("cityscapes_semantic", tmp_path, "val")) == len(truth["cityscapes_semantic"]["val"])


def test_synthetic_cli_writes_a_loadable_dataset(tmp_path, capsys):
    synthetic.main(["--kind", "shapes", "--out", str(tmp_path), "--num-train", "3", "--num-val", "2",
                    "--size", "40"])
    assert "load_source('shapes'" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "panoptic_annotations_trainval2017.zip", "train2017.zip", "val2017.zip"]
    source = load_source("shapes", tmp_path, "val")
    assert source.class_names == ["circle", "square", "triangle", "grass", "water", "sand"]
    assert len(source) == 2 and source[0]["image"].shape == (40, 40, 3)


def test_benchmark_cli_reports_images_per_second(capsys):
    throughput.main(["--num-images", "3", "--image-size", "64", "--batch-size", "2", "--num-batches", "2",
                    "--max-instances", "8"])
    out = capsys.readouterr().out
    assert re.search(r"coco_panoptic at 64px, batch 2.*: \d+\.\d images/s", out), out
