"""How an exported model must be prompted, derived from the checkpoint's processor and hyperparameters.

`vlsafe export` writes these into the exported folder (chat template, BOS behaviour, image preprocessing,
generation_config.json), so transformers, vLLM, TGI or lmms-eval prompt the model the way it was trained, and
the model card lists what they still do differently (`notes`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlsafe.data.encoding.jinja import jinja_chat_template
from vlsafe.data.encoding.processor import VLMProcessor

# vlsafe's GenerationSettings fields that only matter when sampling (vlsafe drops them for greedy decoding;
# transformers warns about, and refuses to save, a greedy config that sets them).
_SAMPLING_ONLY = ("temperature", "top_p", "top_k")


@dataclass
class Prompting:
    """What the export writes so other software prompts and decodes as vlsafe did."""

    template: str
    chat_template: str
    add_bos: bool
    image_preprocess: str                       # "pad" | "resize" (vlsafe.core.interop.IMAGE_PREPROCESS)
    generation_config: dict[str, Any]
    generation_recorded: bool                   # False: the checkpoint stored no generation settings
    notes: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """Plain data for the model card (the Jinja source is in the exported tokenizer, not repeated here)."""
        return {"template": self.template, "add_bos_token": self.add_bos, "image_preprocess": self.image_preprocess,
                "generation_config": self.generation_config, "generation_recorded": self.generation_recorded,
                "notes": list(self.notes)}


def generation_config(processor: VLMProcessor, settings: dict[str, Any] | None) -> dict[str, Any]:
    """transformers `GenerationConfig` fields equal to what `VLMModule.generate_batch` passes to `generate`:
    the processor's pad id, the tokenizer's BOS/EOS ids, and the recipe's `GenerationSettings` (if recorded)."""
    tokenizer = processor.tokenizer
    config: dict[str, Any] = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                              "pad_token_id": processor.pad_token_id}
    if settings:
        settings = dict(settings)
        extra = settings.pop("extra", None) or {}
        if not settings.get("do_sample"):
            for key in _SAMPLING_ONLY:
                settings.pop(key, None)
        elif settings.get("top_k") is None:
            settings["top_k"] = 0  # vlsafe's None = no top-k filter; transformers' None would mean its default 50
        config.update(settings)
        config.update(extra)
    return {key: value for key, value in config.items() if value is not None}


def splits_like_chunks(processor: VLMProcessor, probe: str = "A chat") -> bool:
    """Whether tokenising text right after a special token gives what vlsafe's chunk-wise encoding gives (the
    text around `<image>` and the template's BOS/EOS is tokenised piece by piece, as LLaVA's
    `tokenizer_image_token` does). True for byte-level BPEs and legacy Llama tokenizers (a "▁" before every
    piece); False for Metaspace `prepend_scheme="first"` tokenizers, which prefix only the start of the text."""
    tokenizer = processor.tokenizer
    bos = tokenizer.bos_token
    if not bos:
        return True
    whole = tokenizer(bos + probe, add_special_tokens=False).input_ids
    return whole == [tokenizer.bos_token_id, *tokenizer(probe, add_special_tokens=False).input_ids]


def prompting(processor: VLMProcessor, hparams: dict[str, Any], image_token: str = "<image>") -> Prompting:
    """The prompting setup of a checkpoint: its processor decides template, BOS and images; its hparams decide
    decoding. Raises ValueError for a template that has no Jinja form."""
    template = processor.template.name
    notes = []
    if processor.special_tokens_in_text == "text":
        notes.append("special-token text inside a message (a literal `</s>`) was read as plain characters in "
                     "training (`special_tokens_in_text: text`); transformers does the same only with "
                     "`apply_chat_template(..., tokenize=True, sanitize_control_tokens=True)`, otherwise it "
                     "becomes the control token")
    if not splits_like_chunks(processor):
        notes.append("this tokenizer prefixes only the start of a text with its space marker, so transformers "
                     "tokenises the text right after a special token (BOS, image tokens, `</s><s>`) differently "
                     "from vlsafe's piece-by-piece encoding (LLaVA's `tokenizer_image_token`): the first word "
                     "after such a token loses its leading-space form; no chat template can express this")
    if processor.pad_to_square and processor.pad_color != "mean":
        notes.append(f"training padded images to a square with pad_color={processor.pad_color!r}; the exported "
                     "LlavaImageProcessor pads with the mean colour instead")
    if processor.rgb_mode == "pil":
        notes.append("training dropped alpha (`rgb_mode: pil`, PIL's convert('RGB')); transformers composites "
                     "transparent pixels on white")
    notes.append("images are padded and resized with PIL in vlsafe; load the processor with `backend='pil'` for "
                 "the same pixels (transformers 5's default torchvision backend resizes differently, by a grey "
                 "level on some pixels)")
    notes.append(f"an image whose longer side exceeds {8 * processor.image_size} px (8x the input side) is "
                 "box-reduced by vlsafe before padding, which transformers does not do (a few grey levels)")
    settings = hparams.get("generation")
    return Prompting(template=template,
                     chat_template=jinja_chat_template(template, add_bos=processor.add_bos, image_token=image_token),
                     add_bos=processor.add_bos, image_preprocess="pad" if processor.pad_to_square else "resize",
                     generation_config=generation_config(processor, settings),
                     generation_recorded=isinstance(settings, dict), notes=notes)
