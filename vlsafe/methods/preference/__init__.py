"""Preference optimisation: DPO and its relatives, and MMSafe-PO's Blind Preference Optimization (BPO).

- `module`: `PreferenceModule` (weighted loss terms: the pair, BPO's blind pair, the chosen NLL);
- `losses`: one class per loss (`DPOLoss`, `SimPOLoss`, `ORPOLoss`, `RobustDPOLoss`, ...) with `needs_reference`;
- `encoding`: `PreferenceEncoder`, MMSafe-PO's response format and length rule;
- `shared_prompt`: one prompt forward per sample, every response continued from its KV cache;
- offline jobs that run a model for it: `blind` (image-free answers, `vlsafe blind-generate`), `blind_world`
  (the synthetic world with generated blind answers), `reference` (precomputed reference log-probs,
  `vlsafe precompute-reference`).
The `vlsafe evaluate` suite for MMSafe-PO's benchmark is `vlsafe.eval.suites.mmsafe_po`; its converter
`vlsafe.data.sources.mmsafe_po`.
"""
