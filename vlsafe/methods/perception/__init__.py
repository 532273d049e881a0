"""PerceptionGPT on the shared core: a `<loc>` token whose hidden state is decoded into a box and a mask,
and whose input embedding carries an encoded box (see `vlsafe.methods.perception.module.PerceptionModule`).

- `module`: `PerceptionModule`, the LightningModule; `encoders`: samples with boxes/masks -> tokens and targets;
- the padded-square frame, box formats and text placeholders live in `vlsafe.data.grounding` (converters use them too);
- `heads`: box decoder, box encoder and mask decoder;
- `losses`: L1 + GIoU on boxes, BCE + Dice on masks (pure functions);
- `splice`: writing box embeddings over `<loc>` token embeddings, finding the decoded hidden states;
- `generation`: a KV-cached decoding loop that decodes and re-encodes boxes whenever `<loc>` is emitted;
- `metrics`: REC Acc@0.5, RES cIoU/mIoU per dataset; `evaluation`: grounding predictions for a list of samples
  (perception models and text-coordinate baselines alike); `callbacks`: held-out grounding before/after `fit`;
  `visualize`: PNG overlays. The `vlsafe evaluate` suite is `vlsafe.eval.suites.grounding` (eval sits above methods).
"""
