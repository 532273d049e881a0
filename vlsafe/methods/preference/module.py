"""Preference optimisation for VLMs: the DPO family and Blind Preference Optimization (MMSafe-PO).

BPO adds the *blind* response (what the base model answers without the image) as an extra rejected
answer. Two forms are supported:
- `blind: rows` (what the released code trains): blind pairs are extra rows of the dataset, i.e. shards
  whose `rejected` is the blind answer, mixed in as a second source; the loss is plain DPO, and the module
  checks at fit start that a training source holds blind rows (`meta.pair == "blind"`).
- `blind: sum`: every sample carries `blind`, and the loss is L(y_w, y_l) + L(y_w, y_blind).

Efficiency: the image of a sample is encoded once and its features are reused for every response;
the prompt (image tokens included) runs through the LLM once and every response continues from its
key/value cache (`vlsafe/methods/preference/shared_prompt.py`), responses grouped in length buckets so short ones
are not padded to the longest; the LM head only sees response positions. With a frozen tower the vision
features are also shared between the policy and the reference.
"""
from __future__ import annotations

import copy
from typing import Any, Literal, get_args

import torch
from torchmetrics import MeanMetric, Metric

from vlsafe.builders import VLMBuilder
from vlsafe.constants import IGNORE_INDEX
from vlsafe.core.lora import LoraSettings, is_peft
from vlsafe.core.streaming import has_meta_parameters
from vlsafe.core.vlm import VLM
from vlsafe.data.encoding.encoders import PromptEncoder
from vlsafe.data.shards import read_samples
from vlsafe.methods.base import GenerationSettings, OptimSettings, VLMModule
from vlsafe.methods.logprobs import sequence_logps
from vlsafe.methods.preference.encoding import (
    LENGTH_RULES,
    RESPONSE_FORMATS,
    LengthRule,
    PreferenceEncoder,
    ResponseFormat,
    check_choice,
)
from vlsafe.methods.preference.losses import (
    LossType,
    PairLogps,
    PreferenceLoss,
    loss_from_type,
)
from vlsafe.methods.preference.shared_prompt import (
    BUCKET_COST,
    shared_prompt_logps,
    shared_prompt_plan,
)
from vlsafe.monitoring.metrics import log_metrics, stage_metrics

ReferenceMode = Literal["copy", "adapter", "precomputed", "none"]
BlindMode = Literal["off", "rows", "sum"]
REFERENCE_MODES: tuple[str, ...] = get_args(ReferenceMode)
BLIND_MODES: tuple[str, ...] = get_args(BlindMode)
_STATS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
          "logps/rejected", "rewards/blind", "rewards/blind_accuracies", "rewards/blind_margins", "logps/blind",
          "loss/pair", "loss/blind", "loss/nll")


@torch.no_grad()
def batch_reference_logps(vlm: VLM, batch: dict[str, Any], average: bool = False) -> torch.Tensor:
    """(k, B) log-probs of a frozen model on a `PreferenceEncoder` batch: what `reference: precomputed` reads."""
    k = len(batch["responses"])
    pixels = batch.get("pixel_values")
    features = vlm.encode_images(pixels).repeat(k, 1, 1) if pixels is not None and pixels.numel() else None
    return sequence_logps(vlm, batch, features, average).view(k, -1)


def preference_metrics(with_blind: bool, with_nll: bool = False) -> dict[str, Metric]:
    """Per-sample means of the `compute_loss` stats (TRL's names; documented in docs/metrics.md)."""
    return {n: MeanMetric() for n in _STATS if (with_blind or "blind" not in n) and (with_nll or n != "loss/nll")}


def _parameters_sharded(trainer: Any) -> bool:
    """True under strategies that gather parameters inside every forward (FSDP1/FSDP2, DeepSpeed ZeRO-3)."""
    if trainer is None or trainer.world_size < 2:
        return False
    from lightning.pytorch.strategies import (
        DeepSpeedStrategy,
        FSDPStrategy,
        ModelParallelStrategy,
    )

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy):
        return bool(strategy.zero_stage_3)
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def _all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """`flag` on every rank of the default process group (one tiny all-reduce)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def _checkpointing(llm: torch.nn.Module) -> bool:
    name = "is_activation_checkpointing" if hasattr(llm, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(llm, name, False))


def configured_loss(loss: PreferenceLoss | None, loss_type: str, beta: float, label_smoothing: float) -> PreferenceLoss:
    """The loss object: `loss` if given (the string settings must then be defaults or agree), else `loss_type`'s."""
    if loss is None:
        return loss_from_type(loss_type, beta, label_smoothing)
    if not isinstance(loss, PreferenceLoss):
        raise TypeError(f"loss must be a vlsafe.methods.preference.losses.PreferenceLoss, got {type(loss).__name__}")
    name = loss.loss_type or type(loss).__name__
    clashes = [f"{key}: {value!r}" for key, value, default, own in (
        ("loss_type", loss_type, "sigmoid", name), ("beta", beta, 0.1, loss.beta),
        ("label_smoothing", label_smoothing, 0.0, loss.label_smoothing)) if value not in (default, own)]
    if clashes:
        raise ValueError(f"loss {loss!r} is configured by its init_args; drop {', '.join(clashes)} from the "
                         f"module's arguments (or set them in the loss)")
    return loss


def reference_for(loss: PreferenceLoss, reference: str) -> str:
    """A reference-free loss builds no reference: the default `copy` becomes `none`, others are refused."""
    if loss.needs_reference:
        if reference == "none":
            raise ValueError(f"reference='none' needs a reference-free loss (SimPOLoss, ORPOLoss); {loss!r} needs "
                             f"a reference: use copy, adapter or precomputed")
        return reference
    if reference not in ("copy", "none"):
        raise ValueError(f"{loss!r} needs no reference model; reference={reference!r} would build or read one for "
                         f"nothing: leave `reference` out")
    return "none"


BLIND_ROWS_SCAN = 50_000  # samples read per training source, at most, looking for a blind row


def find_blind_rows(datamodule: Any, limit: int = BLIND_ROWS_SCAN) -> str | None:
    """The first training source holding a blind row (`meta.pair == "blind"`: what `vlsafe blind-generate`
    writes and what the MMSafe-PO converter marks in a concatenated BPO train.json), or None."""
    for source in (getattr(datamodule, "sources", None) or {}).get("fit") or []:
        if any(sample.meta.get("pair") == "blind" for sample in read_samples(source.path, limit=limit)):
            return source.path
    return None


class PreferenceModule(VLMModule):
    """DPO / cDPO / robust / IPO / hinge (+ optional SFT term on chosen, RPO-style) with BPO's blind responses.

    - `loss_type`: `sigmoid` (DPO), `cdpo` and `robust` (with `label_smoothing`), `ipo` (TRL's: log-ratios
      averaged per token), `ipo_sum` (on summed log-ratios), `hinge`; see `vlsafe/methods/preference/losses.py`.
    - `loss`: a `PreferenceLoss` object instead (`loss: {class_path: vlsafe.methods.preference.losses.SimPOLoss,
      init_args: {beta: 2.0, gamma: 0.5}}`), with its own hyperparameters; `loss_type`/`beta`/`label_smoothing` then stay at
      their defaults (or agree with it). The reference-free ones (`SimPOLoss`, `ORPOLoss`) build no reference
      model: the default `reference: copy` becomes `none`; `adapter`/`precomputed` are refused with them.
    - `response_format`: `released` (MMSafe-PO: query ends with the separator after "ASSISTANT:", response
      tokenised on its own, no EOS scored) or `template` (the chat template's turn, " " + response + EOS,
      EOS scored, as SFT trains). `length_rule`: `released` (budget max_length - image tokens; a too-long
      chosen drops the pair, a too-long rejected/blind is cut) or `truncate` (every sequence cut at
      max_length). Left-out and cut pairs are counted and reported at the end of the run, never fatal.
      Both: `vlsafe/methods/preference/encoding.py`.

    - `reference`: `copy` (a frozen copy of the starting model), `adapter` (the same model with its LoRA
      adapter disabled and the starting projector; needs `lora`), or `precomputed` (log-probs stored in
      the shards by tools/precompute_reference.py). All three give the same loss. `none`: only with a
      reference-free loss.
    - Terms, weighted and summed (`term_weights`, logged as `loss/pair`, `loss/blind`, `loss/nll`): the pair's
      loss (weight 1), the blind pair's loss (`blind: sum`, weight `blind_weight`, 1 as in MMSafe-PO's
      `DPO2Trainer`), the chosen token-mean NLL (weight `sft_weight` + the loss's own `nll_weight`, ORPO's term).
    - `average_logprob`: length-normalised response log-probs instead of sums (the paper uses sums).
    - `share_image_features`: encode each image once per sample (default); off = once per sequence,
      as TRL does, kept for benchmarking.
    - `share_prompt`: run each sample's prompt (image tokens included) once and continue every response
      from its key/value cache (default); off = one full forward per response sequence.
    """

    def __init__(self, vlm: VLMBuilder, lora: LoraSettings | None = None, train_vision: bool = False,
                 train_projector: bool = True, train_llm: bool = True, gradient_checkpointing: bool = False,
                 optim: OptimSettings | None = None, generation: GenerationSettings | None = None,
                 beta: float = 0.1, loss_type: LossType = "sigmoid", label_smoothing: float = 0.0,
                 sft_weight: float = 0.0, blind: BlindMode = "off", blind_weight: float | None = None,
                 reference: ReferenceMode = "copy", average_logprob: bool = False, share_image_features: bool = True,
                 share_prompt: bool = True, response_format: ResponseFormat = "released",
                 length_rule: LengthRule = "released", loss: PreferenceLoss | None = None):
        self.loss_fn, self.loss_configured = configured_loss(loss, loss_type, beta, label_smoothing), loss is not None
        # hyperparameters are recorded as given, so a resume's recipe compares equal (checkpoint_guard.check_resume)
        self.given_hparams = {"beta": beta, "loss_type": loss_type, "label_smoothing": label_smoothing,
                              "reference": reference}
        self.response_format = check_choice("response_format", response_format, RESPONSE_FORMATS)
        self.length_rule = check_choice("length_rule", length_rule, LENGTH_RULES)
        self.length_counts: dict[str, int] = {}  # sequences cut by the length rule, per response (this run)
        if blind not in BLIND_MODES:
            raise ValueError(f"unknown blind mode {blind!r}; choose one of {BLIND_MODES}")
        if reference not in REFERENCE_MODES:
            raise ValueError(f"unknown reference {reference!r}; choose one of {REFERENCE_MODES}")
        reference = reference_for(self.loss_fn, reference)
        self.beta, self.label_smoothing = self.loss_fn.beta, self.loss_fn.label_smoothing
        self.loss_type = self.loss_fn.loss_type or type(self.loss_fn).__name__
        self.sft_weight, self.blind, self.reference_mode = sft_weight, blind, reference
        # None = 1 (MMSafe-PO's DPO2Trainer sum); None also keeps checkpoints from before the switch resumable
        self.blind_weight = 1.0 if blind_weight is None else float(blind_weight)
        self.given_blind_weight = blind_weight
        self.average_logprob, self.share_image_features = average_logprob, share_image_features
        self.share_prompt = share_prompt
        super().__init__(vlm=vlm, lora=lora, train_vision=train_vision, train_projector=train_projector,
                         train_llm=train_llm, gradient_checkpointing=gradient_checkpointing, optim=optim,
                         generation=generation)
        if reference == "adapter" and not is_peft(self.vlm.llm):
            raise ValueError("reference='adapter' needs a LoRA adapter (set `lora`); use reference='copy' for "
                             "full fine-tuning")
        self.reference_vlm: VLM | None = None
        self.reference_projector: torch.nn.Module | None = None
        if reference == "copy":
            self.reference_vlm = self._frozen_copy()
        elif reference == "adapter":
            self.reference_projector = copy.deepcopy(self.vlm.projector).requires_grad_(False).eval()
        self.strict_loading = False  # the reference is rebuilt from the builder, never saved
        stages = stage_metrics(preference_metrics(blind == "sum", bool(self.term_weights()["nll"])), ("train", "val"))
        self.train_metrics, self.val_metrics = stages["train"], stages["val"]

    def extra_hparams(self) -> dict[str, Any]:
        return {**self.given_hparams, "sft_weight": self.sft_weight, "blind": self.blind,
                "blind_weight": self.given_blind_weight,
                "average_logprob": self.average_logprob, "share_image_features": self.share_image_features,
                "share_prompt": self.share_prompt, "response_format": self.response_format,
                "length_rule": self.length_rule, "loss": self.loss_fn.hparams() if self.loss_configured else None}

    def _frozen_copy(self) -> VLM:
        """The starting model, frozen. A frozen vision tower is shared rather than copied."""
        vision = self.vlm.vision
        shared_vision = not any(p.requires_grad for p in vision.parameters())
        self.vlm.vision = None
        try:
            reference = copy.deepcopy(self.vlm)
        finally:
            self.vlm.vision = vision
        reference.vision = vision if shared_vision else copy.deepcopy(vision)
        if is_peft(reference.llm):
            # A streamed (meta) base cannot be merged, and needs not be: fresh adapters (B = 0) add nothing, so
            # the base alone is the starting model; configure_model fills it from the same checkpoint.
            streamed = has_meta_parameters(reference.llm)
            reference.llm = reference.llm.unload() if streamed else reference.llm.merge_and_unload()
        return reference.requires_grad_(False).eval()

    def on_fit_start(self) -> None:
        """`blind: rows` promises that blind pairs are extra training rows: check a training source holds them."""
        if self.blind != "rows":
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        if getattr(datamodule, "sources", None) is None:
            return  # a plain dataloader: nothing to inspect
        if find_blind_rows(datamodule) is None:
            paths = [source.path for source in datamodule.sources.get("fit") or []]
            raise ValueError(f"blind: rows, but no training source holds blind rows (samples with meta.pair == "
                             f"'blind' among the first {BLIND_ROWS_SCAN:,} of each of {paths}): add the shards "
                             f"`vlsafe blind-generate --form rows` writes as a source, or set blind: off for plain DPO")

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(("reference_vlm.", "reference_projector."))]:
            del state[key]

    def train(self, mode: bool = True):
        """The reference stays in eval mode (no dropout) whatever Lightning switches the policy to."""
        super().train(mode)
        for name in ("reference_vlm", "reference_projector"):
            if self._modules.get(name) is not None:
                self._modules[name].eval()
        return self

    # ------------------------------------------------------------------ data
    @property
    def responses(self) -> tuple[str, ...]:
        return ("chosen", "rejected", "blind") if self.blind == "sum" else ("chosen", "rejected")

    def data_encoder(self, stage: str):
        if stage == "predict":
            return PromptEncoder(self.processor)
        return PreferenceEncoder(self.processor, self.responses, require_reference=self.reference_mode == "precomputed",
                                 average_logprob=self.average_logprob, response_format=self.response_format,
                                 length_rule=self.length_rule)

    # ------------------------------------------------------------------ log-probs
    def _features(self, pixel_values: torch.Tensor, k: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(policy features, vision features) for all k response groups; images encoded once when sharing."""
        if pixel_values is None or pixel_values.numel() == 0:
            return None, None
        if not self.share_image_features:
            return self.vlm.encode_images(pixel_values.repeat(k, 1, 1, 1)), None
        vision = self.vlm.vision_features(pixel_values)
        return self.vlm.project(vision).repeat(k, 1, 1), vision

    def _logps(self, vlm: VLM, batch: dict[str, Any], features: torch.Tensor | None) -> torch.Tensor:
        if self.share_prompt and not _checkpointing(vlm.llm):  # a KV cache and activation checkpointing don't mix
            plan = shared_prompt_plan(batch)
            sharded = _parameters_sharded(self._trainer)
            # Sharded parameters are gathered per forward, so every rank must run the same forwards: the ranks
            # agree on the shared-prompt path and run the responses as one batch (no length buckets).
            if sharded and not _all_ranks_agree(plan is not None, self.device):
                plan = None
            if plan is not None:
                n = len(batch["ids"])
                return shared_prompt_logps(vlm, batch, None if features is None else features[:n],
                                           self.average_logprob, bucket_cost=None if sharded else BUCKET_COST,
                                           plan=plan)
        return sequence_logps(vlm, batch, features, self.average_logprob)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, Any], vision_features: torch.Tensor | None = None) -> torch.Tensor:
        """Reference log-probs, shape (k * B,), in the batch's sequence order."""
        k = len(batch["responses"])
        if self.reference_mode == "precomputed":
            if batch.get("ref_logps") is None:
                raise ValueError("reference='precomputed' but the batch has no ref_logp_* labels; write them with "
                                 "tools/precompute_reference.py")
            return batch["ref_logps"].to(self.device).reshape(-1)
        pixels = batch.get("pixel_values")
        has_images = pixels is not None and pixels.numel() > 0
        if self.reference_mode == "copy":
            reference = self.reference_vlm
            if has_images:
                shared = vision_features is not None and reference.vision is self.vlm.vision
                vision = vision_features if shared else reference.vision_features(pixels)
                features = reference.project(vision).repeat(k, 1, 1)
            else:
                features = None
            return self._logps(reference, batch, features)
        features = None
        if has_images:
            vision = vision_features if vision_features is not None else self.vlm.vision_features(pixels)
            features = self.reference_projector(vision.to(self.vlm.projector_dtype)).repeat(k, 1, 1)
        with self.vlm.llm.disable_adapter():
            return self._logps(self.vlm, batch, features)

    # ------------------------------------------------------------------ loss
    def compute_loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        k = len(batch["responses"])
        features, vision = self._features(batch.get("pixel_values"), k)
        policy = self._logps(self.vlm, batch, features).view(k, -1)
        reference = None
        if self.loss_fn.needs_reference:
            reference = self.reference_logps(batch, vision).view(k, -1).to(policy.dtype)
        # scored tokens per sequence (TRL's IPO, SimPO, ORPO divide by them); means already when average_logprob
        tokens = None if self.average_logprob else (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).view(k, -1)

        def pair(i: int) -> PairLogps:
            return PairLogps(policy[0], policy[i], None if reference is None else reference[0],
                             None if reference is None else reference[i], None if tokens is None else tokens[0],
                             None if tokens is None else tokens[i])

        losses, chosen_rewards, rejected_rewards = self.loss_fn(pair(1))
        terms = {"pair": losses.mean()}
        stats = {"rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                 "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                 "rewards/margins": chosen_rewards - rejected_rewards,
                 "logps/chosen": policy[0].detach(), "logps/rejected": policy[1].detach()}
        if self.blind == "sum":
            blind_losses, _, blind_rewards = self.loss_fn(pair(2))
            terms["blind"] = blind_losses.mean()
            stats.update({"rewards/blind": blind_rewards, "logps/blind": policy[2].detach(),
                          "rewards/blind_accuracies": (chosen_rewards > blind_rewards).float(),
                          "rewards/blind_margins": chosen_rewards - blind_rewards})
        weights = self.term_weights()
        if weights["nll"]:
            terms["nll"] = self._chosen_nll(batch, policy[0])
        loss = sum(weights[name] * value for name, value in terms.items())
        stats.update({f"loss/{name}": value.detach() for name, value in terms.items()})
        stats["loss"] = loss.detach()
        return loss, stats

    def term_weights(self) -> dict[str, float]:
        """The weight of each loss term (TRL's `loss_weights` idea): the pair's loss, BPO's blind pair (`blind:
        sum`, `blind_weight`, default 1), and the chosen responses' NLL (`sft_weight` + the loss's own, e.g.
        ORPO's). The loss is their sum."""
        return {"pair": 1.0, "blind": self.blind_weight if self.blind == "sum" else 0.0,
                "nll": self.sft_weight + self.loss_fn.nll_weight}

    def _chosen_nll(self, batch: dict[str, Any], chosen_logps: torch.Tensor) -> torch.Tensor:
        """Token-mean NLL of the chosen responses (the RPO / `rpo_alpha` term)."""
        if self.average_logprob:
            return -chosen_logps.mean()
        b = chosen_logps.shape[0]
        tokens = (batch["labels"][:b, 1:] != IGNORE_INDEX).sum(-1).clamp(min=1)
        return -(chosen_logps / tokens).mean()

    def _log_stats(self, stats: dict[str, torch.Tensor], stage: str) -> None:
        log_metrics(self, getattr(self, f"{stage}_metrics"), stats, on_step=stage == "train",
                    prog_bar=("loss", "rewards/accuracies") if stage == "train" else ("rewards/accuracies",))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        for name, n in (batch.get("truncated_responses") or {}).items():
            self.length_counts[name] = self.length_counts.get(name, 0) + int(n)
        self.length_counts["pairs"] = self.length_counts.get("pairs", 0) + len(batch["ids"])
        loss, stats = self.compute_loss(batch)
        self._log_stats(stats, "train")
        return loss

    def on_train_end(self) -> None:
        """Say what the length rule did to the training data: pairs left out, responses cut (also on a
        `KeyboardInterrupt`/preemption, which Lightning ends through this hook too)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        report = getattr(datamodule, "skip_report", None)
        left_out = [row for row in (report.rows.get("train", []) if report is not None else [])
                    if str(row.get("error", "")).startswith("left out")]
        self.length_report = length_summary(self.length_counts, left_out, self.length_rule, self.response_format)
        print(f"vlsafe: {self.length_report}", flush=True)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        _, stats = self.compute_loss(batch)
        self._log_stats(stats, "val")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        responses = self.generate_batch(batch)
        return [{"id": i, "response": r, "reference": ref}
                for i, r, ref in zip(batch["ids"], responses, batch["references"])]


def length_summary(counts: dict[str, int], left_out: list[dict[str, str]], length_rule: str,
                   response_format: str) -> str:
    """One line: pairs trained, pairs the length rule left out (by field), responses it cut (by name)."""
    from collections import Counter

    by_field = Counter(row["field"] for row in left_out)
    reasons = ", ".join(f"{'prompt too long' if f == 'messages' else f + ' too long'} {n}"
                        for f, n in sorted(by_field.items()))
    cut = ", ".join(f"{name} {n}" for name, n in counts.items() if name != "pairs")
    return (f"preference data (length_rule={length_rule}, response_format={response_format}): "
            f"{counts.get('pairs', 0)} pair(s) trained (padding repeats included); {len(left_out)} left out"
            f"{f' ({reasons})' if reasons else ''}; responses cut to fit: {cut or 'none'}")
