"""PerceptionGPT: boxes and masks through a `<loc>` token instead of coordinate text.

- A `<loc>` token is added to the tokenizer; its new input/output embedding rows start at the mean of the
  old rows (as the released code does).
- Output side: the final hidden state that predicts `<loc>` (position - 1) prompts a small two-way-attention
  decoder over the vision tower's patch features (see `vlsafe.methods.perception.heads`), which reads a mask and,
  by default (`box_decoder="image"`), the box from the image. The released head, an MLP on the hidden
  state alone (`box_decoder="mlp"`), stays available: it needs an LLM whose hidden state already carries
  coordinates (a pretrained Shikra/LLaVA), which a tiny random-init LLM does not learn in minutes.
- Input side: every `<loc>` embedding is replaced by `box_encoder(box)`: boxes in questions, and, by
  teacher forcing, the ground-truth boxes at answer positions (the released code's training).
- Loss: `lm * CE + box_l1 * L1 + box_giou * (1 - GIoU) + mask_bce * BCE + mask_dice * Dice`.
- LoRA (if set) adapts the LLM; the heads, and by default the token embeddings and LM head (which hold the
  new `<loc>` rows), train fully.
"""
from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torchmetrics import MeanMetric

from vlsafe.builders import VLMBuilder
from vlsafe.core.lora import LoraSettings, is_peft
from vlsafe.core.vlm import position_ids_from_mask
from vlsafe.data.encoding.processor import pad_fill
from vlsafe.data.grounding import LOC_TOKEN
from vlsafe.methods.base import GenerationSettings, OptimSettings, VLMModule, _as
from vlsafe.methods.logprobs import masked_lm_loss, supervised_positions
from vlsafe.methods.perception.encoders import (
    PerceptionEncoder,
    PerceptionPromptEncoder,
)
from vlsafe.methods.perception.features import perception_vision
from vlsafe.methods.perception.generation import (
    PerceptionOutput,
    generate_with_perception,
)
from vlsafe.methods.perception.heads import (
    BoxDecoderKind,
    MaskDecoderSettings,
    PerceptionHeads,
)
from vlsafe.methods.perception.losses import (
    DICE_REDUCTIONS,
    GIOU_BOXES,
    DiceReduction,
    GiouBoxes,
    LossWeights,
    perception_losses,
)
from vlsafe.methods.perception.metrics import GroundingMetrics
from vlsafe.methods.perception.splice import (
    splice_loc_embeddings,
    target_loc_context,
    target_loc_hidden,
)


def add_perception_tokens(llm: torch.nn.Module, tokenizer, tokens: list[str]) -> list[int]:
    """Add `tokens` to the tokenizer and both embedding matrices; new rows = mean of the old rows."""
    base = llm.get_base_model() if is_peft(llm) else llm
    old = base.get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens([t for t in tokens if t not in tokenizer.get_vocab()])
    if len(tokenizer) > old:
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        with torch.no_grad():
            for matrix in (base.get_input_embeddings(), base.get_output_embeddings()):
                if matrix is not None and matrix.weight.shape[0] > old:
                    matrix.weight[old:] = matrix.weight[:old].mean(0, keepdim=True)
    return tokenizer.convert_tokens_to_ids(tokens)


class PerceptionModule(VLMModule):
    """LM loss + box (L1, GIoU) + mask (BCE, Dice) losses around a `<loc>` perception token.

    - `loss_weights`: `LossWeights` fields (`lm`, `box_l1`, `box_giou`, `mask_bce`, `mask_dice`).
    - `box_decoder`: `"image"` (default: a box token in the mask decoder reads the patches) or `"mlp"`
      (released: an MLP on the `<loc>` hidden state); see `vlsafe.methods.perception.heads`.
    - `box_hidden` / `box_layers`: the box decoder/encoder MLPs (released: 512, 3).
    - `mask_decoder`: `MaskDecoderSettings`; `mask_size`: side of predicted/target masks in the square frame
      (default: the image size the tower sees).
    - `train_embeddings`: keep the token embeddings and LM head trainable under LoRA (the released code does;
      they hold the new `<loc>` rows). `head_lr`: learning rate of the heads (default `optim.lr`).
    - `mask_threshold`: probability above which a pixel counts as inside (released evaluation: 0.35).
    - `text_boxes`: also read "[x1, y1, x2, y2]" text boxes in samples as `<loc>` (the synthetic world's
      grounding answers are written that way).
    - `dice_reduction`: `"batch"` (released: one Dice pooled over every mask of the batch) or `"per_mask"`
      (vlsafe's variant: the mean of one Dice per mask); see `vlsafe.methods.perception.losses`.
    - `giou_boxes`: `"xyxy"` (GIoU on the boxes as they are) or `"released"` (the release re-reads xyxy boxes
      as (cx, cy, w, h) before GIoU); see `vlsafe.methods.perception.losses`.
    - `pad_color`: the square padding of images, `"mean"` (LLaVA), `"white"` (Shikra, the released
      PerceptionGPT base) or an RGB triple; `None` keeps the processor's own (mean). Boxes and masks are placed
      in the padded frame either way; only the pixels of the padding change.
    - `mask_decoder.vision_features`: `"merged"` (released: learned softmax merge of the tower's layers) or
      `"select_layer"` (the projector's features); see `vlsafe.methods.perception.features`.
    """

    def __init__(self, vlm: VLMBuilder, lora: LoraSettings | None = None, train_vision: bool = False,
                 train_projector: bool = True, train_llm: bool = True, gradient_checkpointing: bool = False,
                 optim: OptimSettings | None = None, generation: GenerationSettings | None = None,
                 loss_weights: LossWeights | None = None, box_hidden: int = 512,
                 box_layers: int = 3, mask_decoder: MaskDecoderSettings | None = None,
                 mask_size: int | None = None, train_embeddings: bool = True, head_lr: float | None = None,
                 mask_threshold: float = 0.35, text_boxes: bool = True, box_decoder: BoxDecoderKind = "image",
                 dice_reduction: DiceReduction = "per_mask", pad_color: str | tuple[int, int, int] | None = None,
                 giou_boxes: GiouBoxes = "xyxy"):
        if dice_reduction not in DICE_REDUCTIONS:
            raise ValueError(f"dice_reduction must be one of {DICE_REDUCTIONS}, got {dice_reduction!r}")
        if giou_boxes not in GIOU_BOXES:
            raise ValueError(f"giou_boxes must be one of {GIOU_BOXES}, got {giou_boxes!r}")
        self.giou_boxes = giou_boxes
        self.dice_reduction, self.pad_color = dice_reduction, pad_color
        self.loss_weights = _as(LossWeights, loss_weights) or LossWeights()
        self.mask_settings = _as(MaskDecoderSettings, mask_decoder) or MaskDecoderSettings()
        self.box_hidden, self.box_layers, self.mask_size_setting = box_hidden, box_layers, mask_size
        self.train_embeddings, self.head_lr = train_embeddings, head_lr
        self.mask_threshold, self.text_boxes, self.box_decoder = mask_threshold, text_boxes, box_decoder
        super().__init__(vlm=vlm, lora=lora, train_vision=train_vision, train_projector=train_projector,
                         train_llm=train_llm, gradient_checkpointing=gradient_checkpointing, optim=optim,
                         generation=generation)
        if pad_color is not None:
            pad_fill(pad_color, self.processor.image_mean)  # fails here, naming the option, if malformed
            self.processor.pad_color = tuple(pad_color) if isinstance(pad_color, list) else pad_color
        (self.loc_token_id,) = add_perception_tokens(self.vlm.llm, self.processor.tokenizer, [LOC_TOKEN])
        if self.lora is not None or not self.hparams["train_llm"]:
            base = self.vlm.llm.get_base_model() if is_peft(self.vlm.llm) else self.vlm.llm
            for matrix in (base.get_input_embeddings(), base.get_output_embeddings()):
                if matrix is not None:
                    matrix.requires_grad_(train_embeddings)
        self.mask_size = mask_size or self.processor.image_size
        self.heads = PerceptionHeads(self.vlm.llm_config.hidden_size, self.vlm.vision.hidden_size, self.mask_size,
                                     box_hidden, box_layers, self.mask_settings, box_decoder,
                                     vision_layers=self.vlm.vision.num_layers)
        self.val_metrics = GroundingMetrics(mask_threshold)
        self.val_losses = torch.nn.ModuleDict({name: MeanMetric() for name in
                                               ("loss", "lm", "box_l1", "box_giou", "mask_bce", "mask_dice")})

    def extra_hparams(self) -> dict[str, Any]:
        return {"loss_weights": asdict(self.loss_weights), "box_hidden": self.box_hidden,
                "box_layers": self.box_layers, "mask_decoder": asdict(self.mask_settings),
                "mask_size": self.mask_size_setting, "train_embeddings": self.train_embeddings,
                "head_lr": self.head_lr, "mask_threshold": self.mask_threshold, "text_boxes": self.text_boxes,
                "box_decoder": self.box_decoder, "dice_reduction": self.dice_reduction, "giou_boxes": self.giou_boxes,
                "pad_color": list(self.pad_color) if isinstance(self.pad_color, tuple) else self.pad_color}

    # ------------------------------------------------------------------ data
    def data_encoder(self, stage: str):
        cls = PerceptionPromptEncoder if stage == "predict" else PerceptionEncoder
        return cls(self.processor, self.loc_token_id, self.mask_size, self.text_boxes)

    # ------------------------------------------------------------------ optimisation
    def _param_groups(self) -> list[dict[str, Any]]:
        groups = super()._param_groups()
        lr = self.optim.lr if self.head_lr is None else self.head_lr
        decay = [p for n, p in self.heads.named_parameters() if p.requires_grad and p.ndim >= 2 and "norm" not in n]
        no_decay = [p for n, p in self.heads.named_parameters()
                    if p.requires_grad and not (p.ndim >= 2 and "norm" not in n)]
        groups.append({"params": decay, "lr": lr, "weight_decay": self.optim.weight_decay, "name": "perception"})
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "perception_no_decay"})
        return groups

    def on_fit_start(self) -> None:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        heads = sum(p.numel() for p in self.heads.parameters())
        self.print(f"vlsafe: {trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%), "
                   f"{heads:,} in the perception heads")

    # ------------------------------------------------------------------ forward
    def forward_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """One teacher-forced pass: LM logits on supervised positions, boxes and mask logits per target `<loc>`."""
        pixels = batch.get("pixel_values")
        vision = features = None
        if pixels is not None and pixels.numel():
            pixels = self.vlm.vision.normalize(pixels)  # uint8 from the loader; the pixel skip reads them too
            projected, vision = perception_vision(self.vlm, pixels, self.heads.layer_merge)
            features = self.vlm.project(projected)
        input_ids, labels = batch["input_ids"], batch["labels"]
        embeddings = self.vlm.embed(input_ids, features)
        loc_boxes = batch["loc_boxes"].to(embeddings.device)
        embeddings = splice_loc_embeddings(embeddings, input_ids, self.loc_token_id, self.heads.box_encoder(loc_boxes))
        positions, targets = supervised_positions(labels)
        out = self.vlm.llm(inputs_embeds=embeddings, attention_mask=batch["attention_mask"],
                           position_ids=position_ids_from_mask(batch["attention_mask"]), logits_to_keep=positions,
                           output_hidden_states=True, use_cache=False)
        last = out.hidden_states[-1]
        states, is_target = target_loc_hidden(last, input_ids, labels, self.loc_token_id)
        question = None
        if self.mask_settings.read_question:
            question = target_loc_context(out.hidden_states[self.mask_settings.question_layer], input_ids,
                                          batch["attention_mask"], labels, self.loc_token_id)
        decoded = self.heads.decode(states, batch["target_image"], vision, pixels,
                                    want_masks=batch["target_mask_valid"].to(states.device), question=question)
        return {"logits": out.logits, "targets": targets, "pred_boxes": decoded.boxes,
                "target_boxes": loc_boxes[is_target], "mask_logits": decoded.mask_logits,
                "mask_rows": decoded.mask_rows}

    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        result = self.forward_batch(batch)
        lm, correct, n_tokens = masked_lm_loss(result["logits"], result["targets"])
        terms = {"lm": lm}
        if result["pred_boxes"].shape[0]:
            target_masks = None
            if result["mask_rows"] is not None:
                target_masks = batch["target_masks"].to(result["mask_logits"].device)[result["mask_rows"]]
            terms.update(perception_losses(result["pred_boxes"], result["target_boxes"], result["mask_logits"],
                                           target_masks, self.dice_reduction, self.giou_boxes))
        weights = asdict(self.loss_weights)
        loss = sum(weights[name] * value for name, value in terms.items())
        terms["token_acc"] = correct.float() / max(n_tokens, 1)
        return loss, terms, result

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss, terms, _ = self.compute_loss(batch)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        for name, value in terms.items():
            self.log(f"train/{name}", value.detach(), batch_size=size, prog_bar=name == "box_giou")
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        """Teacher-forced evaluation (what the released `validate` does): GT text, GT `<loc>` positions."""
        loss, terms, result = self.compute_loss(batch)
        self.val_losses["loss"].update(loss)
        for name, value in terms.items():
            if name in self.val_losses:
                self.val_losses[name].update(value)
        pred_masks = gt_masks = None
        if result["mask_rows"] is not None:
            pred_masks = torch.zeros_like(batch["target_masks"], dtype=torch.bool)
            pred_masks[result["mask_rows"]] = result["mask_logits"].float().sigmoid() > self.mask_threshold
            gt_masks = batch["target_masks"] > 0.5
        has_mask = torch.zeros_like(batch["target_mask_valid"])
        if result["mask_rows"] is not None:
            has_mask[result["mask_rows"]] = True
        self.val_metrics.update(result["pred_boxes"].detach().float().clamp(0, 1), result["target_boxes"],
                                pred_masks, gt_masks, has_mask)
        size = batch["input_ids"].shape[0]
        for name, metric in self.val_losses.items():
            self.log(f"{stage}/{name}", metric, batch_size=size)

    def _log_grounding(self, stage: str) -> None:
        summary = self.val_metrics.compute()
        for name, value in summary.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in ("acc@0.5", "ciou"))
        self.val_metrics.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_grounding("val")

    def on_test_epoch_end(self) -> None:
        self._log_grounding("test")

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate_perception(self, batch: dict[str, Any], decode_masks: bool = True,
                            **overrides: Any) -> list[PerceptionOutput]:
        """Generate for a `PerceptionPromptEncoder` batch; boxes and masks come back with the tokens."""
        settings = {**asdict(self.generation), **overrides}
        device = self.device
        pixels = batch.get("pixel_values")
        return generate_with_perception(
            self.vlm, self.heads, self.loc_token_id, batch["input_ids"].to(device), batch["attention_mask"].to(device),
            pixels.to(device) if pixels is not None else None, batch["loc_boxes"].to(device),
            batch["image_index"].to(device), max_new_tokens=settings["max_new_tokens"],
            eos_token_id=self.processor.tokenizer.eos_token_id, pad_token_id=self.processor.pad_token_id,
            do_sample=settings["do_sample"], temperature=settings["temperature"], decode_masks=decode_masks)

    @torch.no_grad()
    def generate_batch(self, batch: dict[str, Any], **overrides: Any) -> list[str]:
        """Text of each answer, `<loc>` included (boxes: `generate_perception`)."""
        if "loc_boxes" not in batch:  # a plain PromptEncoder batch: the prompt has no boxes
            batch = {**batch, "loc_boxes": torch.zeros(0, 4), "image_index": _image_index(batch)}
        return [self.processor.decode(o.token_ids) for o in self.generate_perception(batch, decode_masks=False,
                                                                                     **overrides)]

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        outputs = self.generate_perception(batch, decode_masks=False)
        return [{"id": i, "response": self.processor.decode(o.token_ids), "reference": ref,
                 "boxes": [[round(v, 4) for v in b.tolist()] for b in o.boxes]}
                for i, o, ref in zip(batch["ids"], outputs, batch["references"])]


def _image_index(batch: dict[str, Any]) -> torch.Tensor:
    """First-image index per row for a batch without one: rows are assumed to hold one image each."""
    rows = batch["input_ids"].shape[0]
    pixels = batch.get("pixel_values")
    if pixels is None or pixels.shape[0] == 0:
        return torch.full((rows,), -1, dtype=torch.long)
    if pixels.shape[0] != rows:
        raise ValueError("generate_batch without image_index needs exactly one image per row")
    return torch.arange(rows)
