"""Grounding suite: REC Acc@0.5 and RES cIoU/mIoU per dataset, with PNGs of predicted vs true boxes/masks.

Eval-spec options (unknown keys raise):
- `path`: a shard directory of grounding samples (e.g. `tools/make_shards.py refcoco ... --out`); or
- `synthetic`: a number of fresh held-out synthetic `grounding` samples (with `seed`, `split`);
- `max_samples`, `max_new_tokens` (32), `mask_threshold` (the model's, else 0.35);
- `visualize`: how many samples to draw into `<out_dir>/vis/` (16; 0 = none);
- `image_preprocess`: `pad` only (the default, as PerceptionGPT/Shikra pad to a square): boxes and masks are
  scored in the padded frame, and a centre crop would cut targets off.
Perception models answer with `<loc>`; other models are scored on the text coordinates they write.
Every dataset's rates come with its sample count, `grounding/<dataset>/n`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from vlsafe.eval.suites import SuiteResult, check_options

SUITE_NAME = "grounding"
OPTIONS = {"path", "synthetic", "seed", "split", "max_samples", "max_new_tokens", "mask_threshold", "visualize",
           "image_preprocess"}


def _samples(options: dict[str, Any]) -> list:
    limit = options.get("max_samples")
    if options.get("path"):
        from vlsafe.data.shards import read_samples

        return list(read_samples(options["path"], limit=limit))
    if options.get("synthetic"):
        from vlsafe.data.synthetic.world import generate

        n = int(options["synthetic"]) if limit is None else min(int(options["synthetic"]), int(limit))
        return list(generate(n, seed=int(options.get("seed", 0)), kinds=["grounding"],
                             split=str(options.get("split", "heldout"))))
    raise ValueError("grounding suite: set `path` (a shard directory) or `synthetic` (a number of samples)")


def evaluate(model: Any, options: dict[str, Any], out_dir: str | Path, *, batch_size: int = 16,
             progress: bool = True) -> SuiteResult:
    from vlsafe.methods.perception.evaluation import ground_samples, summarise
    from vlsafe.methods.perception.visualize import draw_grounding, save_png

    check_options(options, OPTIONS, SUITE_NAME)
    if options.get("image_preprocess", "pad") != "pad":
        raise ValueError(f"suite 'grounding': image_preprocess must be 'pad' (boxes and masks are scored in the "
                         f"padded frame), got {options['image_preprocess']!r}")
    out_dir = Path(out_dir)
    predictions = ground_samples(model, _samples(options), batch_size=batch_size,
                                 max_new_tokens=int(options.get("max_new_tokens", 32)),
                                 mask_threshold=options.get("mask_threshold"), progress=progress)
    rows = summarise(predictions)
    metrics = {f"grounding/{row['dataset']}/{key}": float(value) for row in rows for key, value in row.items()
               if key not in ("dataset", "n")}
    metrics.update({f"grounding/{row['dataset']}/n": row["n"] for row in rows if "n" in row})
    processor = model.processor
    background = tuple(int(m * 255) for m in processor.image_mean)
    for p in predictions[:int(options.get("visualize", 16))]:
        caption = f"{p.sample.meta.get('expression') or p.sample.id}  IoU {p.box_iou:.2f}"
        image = draw_grounding(p.sample.images[0], [p.gt_box], [p.pred_box], [p.gt_mask], [p.pred_mask],
                               pad_to_square=processor.pad_to_square, background=background, caption=caption)
        safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in p.sample.id)
        save_png(image, out_dir / "vis" / f"{safe_id}-{p.index}.png")
    return SuiteResult(metrics=metrics, tables={"grounding": rows}, predictions=[p.record() for p in predictions],
                       info={"image_preprocess": "pad" if processor.pad_to_square else "resize"})
