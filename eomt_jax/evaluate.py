"""`python -m eomt_jax.evaluate`: score predictions stored in the standard formats, for this model or any other.

    python -m eomt_jax.evaluate panoptic --gt-json panoptic_val2017.json --gt-dir panoptic_val2017/ \\
        --pred-json panoptic.json --pred-dir panoptic/
    python -m eomt_jax.evaluate instance --gt-json instances_val2017.json --pred-json instances.json
    python -m eomt_jax.evaluate semantic --gt-dir gt/ --pred-dir pred/ --num-classes 150 [--ignore-index 255] \\
        [--label-offset K]

The last line on stdout is one JSON object with the metrics in percent: panoptic PQ/SQ/RQ (all, things, stuff) with
the COCO panopticapi rules, instance AP/AP50/AP75/APs/APm/APl with pycocotools `COCOeval(iouType="segm")` (areas
from the annotation file, the official protocol), semantic mIoU and pixel accuracy. A figure with nothing to score
against (AP of large objects when there are none) is null, not 0. `--per-class FILE` writes the per-class table as
JSON. Folders may also be zip files.

Inputs that cannot be scored (truncated or invalid JSON, a result without `score`, image or category ids the ground
truth does not have, masks of another size than their image, an empty ground truth) end in one line on stderr,
`error: FILE: what was expected`, and exit status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eomt_jax.evaluation.scoring import score_instance, score_panoptic, score_semantic


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eomt_jax.evaluate", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="task", required=True)
    pan = sub.add_parser("panoptic")
    pan.add_argument("--gt-json", required=True)
    pan.add_argument("--gt-dir", required=True)
    pan.add_argument("--pred-json", required=True)
    pan.add_argument("--pred-dir", required=True)
    ins = sub.add_parser("instance")
    ins.add_argument("--gt-json", required=True)
    ins.add_argument("--pred-json", required=True)
    sem = sub.add_parser("semantic")
    sem.add_argument("--gt-dir", required=True)
    sem.add_argument("--pred-dir", required=True)
    sem.add_argument("--num-classes", type=int, required=True)
    sem.add_argument("--ignore-index", type=int, default=255)
    sem.add_argument("--label-offset", type=int, default=0)
    for s in (pan, ins, sem):
        s.add_argument("--per-class", help="write the per-class table (JSON) to this file")
    args = p.parse_args(argv)
    try:
        if args.task == "panoptic":
            results, per_class = score_panoptic(args.gt_json, args.gt_dir, args.pred_json, args.pred_dir)
        elif args.task == "instance":
            results, per_class = score_instance(args.gt_json, args.pred_json)
        else:
            results, per_class = score_semantic(args.gt_dir, args.pred_dir, args.num_classes, args.ignore_index,
                                                args.label_offset)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.per_class:
        Path(args.per_class).write_text(json.dumps(per_class, indent=2) + "\n")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
