"""PerceptionGPT on the shared core: a `<loc>` token whose hidden state is decoded into a box and a mask,
and whose input embedding carries an encoded box (see `vlsafe.methods.perception.PerceptionModule`).

- `boxes`: the padded-square frame every box and mask lives in, and box format conversions;
- `heads`: box decoder, box encoder and mask decoder;
- `losses`: L1 + GIoU on boxes, BCE + Dice on masks (pure functions);
- `splice`: writing box embeddings over `<loc>` token embeddings, finding the decoded hidden states;
- `generation`: a KV-cached decoding loop that decodes and re-encodes boxes whenever `<loc>` is emitted;
- `metrics`: REC Acc@0.5, RES cIoU/mIoU per dataset; `evaluation`: grounding predictions for a list of samples
  (perception models and text-coordinate baselines alike); `visualize`: PNG overlays.
"""
