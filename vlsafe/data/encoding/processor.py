"""Turn samples into model inputs: chat template -> token ids with exact labels, images -> tensors.

The processor belongs to the model (its tokenizer, image size and normalisation must match the
weights) and is handed to the data pipeline, where it runs inside the dataloader workers.
"""
from __future__ import annotations

import bisect
import io
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from PIL import Image

from vlsafe.constants import IGNORE_INDEX, IMAGE_PLACEHOLDER, IMAGE_TOKEN_INDEX
from vlsafe.core.vision import normalize_pixels
from vlsafe.data.encoding.templates import (
    ChatTemplate,
    Segment,
    SpecialToken,
    get_template,
)
from vlsafe.data.images import (  # noqa: F401
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    RGB_MODES,
    Presize,
    RgbMode,
    check_presized,
    decode_image,
    expand2square,
    mean_fill,
    presized_pixels,
    square_image,
    to_rgb,
)
from vlsafe.data.schema import (
    SampleError,
    check_text_length,
    default_max_text_chars,
    is_blank,
)

# A private-use character that stands in for the template's special tokens while a conversation that contains
# special-token text (a literal "</s>") is tokenised as plain text; see `VLMProcessor._encode_plain`.
_SPECIAL_STANDIN = "\U000F0000"
#: How special-token text inside a conversation is read (`VLMProcessor(special_tokens_in_text=)`): "text" (vlsafe:
#: as plain characters) or "control" (the released LLaVA / MMSafe-PO tokenisation: the tokenizer's own call, so
#: a literal "</s>" in an answer becomes the EOS id and ends it).
SpecialTokenRule = Literal["text", "control"]
SPECIAL_TOKEN_RULES: tuple[str, ...] = get_args(SpecialTokenRule)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class VLMProcessor:
    """Tokenises conversations for one model and preprocesses its images.

    Every `<image>` placeholder becomes `num_image_tokens` copies of `IMAGE_TOKEN_INDEX`; text between
    placeholders is tokenised chunk by chunk (as LLaVA's `tokenizer_image_token` does), and a token is
    supervised iff its characters overlap an assistant reply or its end-of-turn marker.

    Only the template's own BOS/EOS (`SpecialToken`) become special ids: special-token text inside the
    conversation (an answer quoting `</s>`, scraped HTML with `<s>`) is tokenised as plain text.
    `special_tokens_in_text="control"` reproduces the released code instead (the tokenizer's own call reads
    such text as the special token: a quoted `</s>` becomes EOS).
    `max_text_chars` (default `VLSAFE_MAX_TEXT_CHARS` or 100,000; 0: no cap) refuses a longer message before
    the tokenizer sees it.
    """

    def __init__(self, tokenizer, template: str | ChatTemplate = "vicuna_v1", *, image_size: int = 336,
                 num_image_tokens: int = 576, image_mean: tuple[float, ...] = OPENAI_CLIP_MEAN,
                 image_std: tuple[float, ...] = OPENAI_CLIP_STD, max_length: int = 2048,
                 pad_to_square: bool = True, add_bos: bool | None = None,
                 pad_color: str | tuple[int, int, int] = "mean", max_text_chars: int | None = None,
                 special_tokens_in_text: SpecialTokenRule = "text", rgb_mode: RgbMode = "composite"):
        if rgb_mode not in RGB_MODES:  # "pil": LLaVA's convert('RGB'), alpha dropped (vlsafe.data.images.to_rgb)
            raise ValueError(f"rgb_mode must be one of {RGB_MODES}, got {rgb_mode!r}")
        if special_tokens_in_text not in SPECIAL_TOKEN_RULES:
            raise ValueError(f"special_tokens_in_text must be one of {SPECIAL_TOKEN_RULES}, got "
                             f"{special_tokens_in_text!r}")
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("VLMProcessor needs a fast (Rust) tokenizer for character offsets; load it with "
                             "AutoTokenizer.from_pretrained(..., use_fast=True)")
        self.tokenizer = tokenizer
        self.template = get_template(template)
        self.image_size = int(image_size)
        self.num_image_tokens = int(num_image_tokens)
        self.image_mean = tuple(float(x) for x in image_mean)
        self.image_std = tuple(float(x) for x in image_std)
        self.max_length = int(max_length)
        self.pad_to_square = pad_to_square
        self.pad_color = pad_color
        self.rgb_mode = rgb_mode
        self.add_bos = tokenizer.bos_token_id is not None if add_bos is None else add_bos
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.eos_token_id
        self.pad_token_id = int(pad)
        self.max_text_chars = default_max_text_chars() if max_text_chars is None else int(max_text_chars)
        self.special_tokens_in_text = special_tokens_in_text
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ())) | frozenset(
            i for i, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
            if getattr(token, "special", False))
        self._plain_backend = None  # built on first need (see _encode_plain)

    # ------------------------------------------------------------------ text
    @property
    def eos(self) -> str:
        return self.tokenizer.eos_token or ""

    def _tokenize_segments(self, segments: list[Segment], sample_id: str = "?") -> tuple[list[int], list[int]]:
        supervised_spans, special_spans, cursor = [], [], 0
        for segment_text, supervised in segments:
            if supervised:
                supervised_spans.append((cursor, cursor + len(segment_text)))
            if isinstance(segment_text, SpecialToken) and segment_text:
                special_spans.append((cursor, cursor + len(segment_text)))
            cursor += len(segment_text)
        text = "".join(s for s, _ in segments)
        ids: list[int] = [self.tokenizer.bos_token_id] if self.add_bos else []
        labels: list[int] = [IGNORE_INDEX] * len(ids)
        chunk_start = 0
        for i, chunk in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if i > 0:
                ids += [IMAGE_TOKEN_INDEX] * self.num_image_tokens
                labels += [IGNORE_INDEX] * self.num_image_tokens
            if chunk:
                specials = [(start - chunk_start, end - chunk_start) for start, end in special_spans
                            if chunk_start <= start < chunk_start + len(chunk)]
                for token_id, (start, end) in self._encode_chunk(chunk, specials, sample_id):
                    start, end = start + chunk_start, max(end, start + 1) + chunk_start
                    supervised = any(start < span_end and end > span_start
                                     for span_start, span_end in supervised_spans)
                    ids.append(token_id)
                    labels.append(token_id if supervised else IGNORE_INDEX)
            chunk_start += len(chunk) + len(IMAGE_PLACEHOLDER)
        return ids, labels

    def _encode_chunk(self, chunk: str, specials: list[tuple[int, int]],
                      sample_id: str) -> list[tuple[int, tuple[int, int]]]:
        """(id, character span) of every token of one text chunk; `specials` are the template's special tokens.

        The tokenizer's own call is kept whenever every special id it finds is one the template placed (the
        common case, so tokenisation is unchanged); a special id from the conversation's text means that
        text quoted a special token, and the chunk is tokenised again with that text read as plain text.
        With `special_tokens_in_text="control"` the tokenizer's own call is always kept (the released rule)."""
        enc = self.tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
        tokens = list(zip(enc["input_ids"], enc["offset_mapping"]))
        if self.special_tokens_in_text == "control":
            return tokens
        if not any(token_id in self._special_ids and not any(start < s_end and end > s_start
                                                              for s_start, s_end in specials)
                   for token_id, (start, end) in tokens):
            return tokens
        return self._encode_plain(chunk, specials, sample_id)

    def _encode_plain(self, chunk: str, specials: list[tuple[int, int]],
                      sample_id: str) -> list[tuple[int, tuple[int, int]]]:
        """Tokenise with every special-token string read as text, except the template's own special tokens.

        One call over the whole chunk, as the tokenizer would make it: the template's special tokens are
        replaced by a stand-in character that a copy of the tokenizer knows as a (non-special) added token,
        so the text around them is split and pre-tokenised exactly as before, then mapped back."""
        if _SPECIAL_STANDIN in chunk:
            raise SampleError(sample_id, "messages", f"contains U+{ord(_SPECIAL_STANDIN):X}, a private-use "
                                                     f"character vlsafe reserves while tokenising special-token text")
        backend, standin_id = self._plain_tokenizer()
        parts, standins, shifts, cursor, length = [], [], [0], 0, 0
        for start, end in specials:
            parts += [chunk[cursor:start], _SPECIAL_STANDIN]
            length += start - cursor
            standins.append((length, start, end, self.tokenizer.convert_tokens_to_ids(chunk[start:end])))
            shifts.append(shifts[-1] + (end - start) - 1)
            length += 1
            cursor = end
        parts.append(chunk[cursor:])
        encoding = backend.encode("".join(parts), add_special_tokens=False)
        positions = [position for position, *_ in standins]
        tokens = []
        for token_id, (start, end) in zip(encoding.ids, encoding.offsets):
            if token_id == standin_id:
                _, original_start, original_end, special_id = standins[bisect.bisect_left(positions, start)]
                tokens.append((special_id, (original_start, original_end)))
            else:
                shift = shifts[bisect.bisect_right(positions, start)]
                tokens.append((token_id, (start + shift, end + shift)))
        return tokens

    def _plain_tokenizer(self):
        """A copy of the tokenizer's Rust backend that reads special-token text as text and knows the stand-in."""
        if self._plain_backend is None:
            from tokenizers import AddedToken, Tokenizer

            backend = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
            backend.no_truncation()
            backend.no_padding()
            backend.add_tokens([AddedToken(_SPECIAL_STANDIN, special=False, normalized=False)])
            backend.encode_special_tokens = True
            self._plain_backend = (backend, backend.token_to_id(_SPECIAL_STANDIN))
        return self._plain_backend

    def check_text_lengths(self, messages: list[dict[str, str]], sample_id: str) -> None:
        """Refuse any message over `max_text_chars` before tokenising (microseconds, not a minute per field)."""
        if self.max_text_chars:
            for i, message in enumerate(messages):
                check_text_length(message["content"], self.max_text_chars, sample_id, f"messages[{i}].content")

    def _truncate(self, ids: list[int], labels: list[int], sample_id: str, need_labels: bool) -> Encoded:
        if len(ids) <= self.max_length:
            return Encoded(ids, labels)
        cut = self.max_length
        if IMAGE_TOKEN_INDEX in ids[cut:]:
            # Cutting image tokens would desynchronise features and slots (the classic "image features
            # and image tokens do not match" crash), so refuse instead of truncating.
            raise SampleError(sample_id, "messages", f"{len(ids)} tokens: max_length={self.max_length} would cut "
                                                     f"into an image's {self.num_image_tokens} tokens")
        encoded = Encoded(ids[:cut], labels[:cut], truncated=True)
        if need_labels and encoded.num_supervised == 0:
            raise SampleError(sample_id, "messages", f"{len(ids)} tokens: truncation to max_length="
                                                     f"{self.max_length} removes every supervised token")
        return encoded

    def encode_conversation(self, messages: list[dict[str, str]], sample_id: str = "?") -> Encoded:
        """A full conversation ending in an assistant turn; labels cover the assistant replies."""
        if not any(m["role"] == "assistant" for m in messages):
            raise SampleError(sample_id, "messages", "has no assistant turn to learn from")
        self.check_text_lengths(messages, sample_id)
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and is_blank(message["content"]):
                raise SampleError(sample_id, f"messages[{i}].content", "assistant answer is empty (or only "
                                                                       "whitespace/zero-width characters)")
        segments = self._segments(messages, sample_id, add_generation_prompt=False)
        encoded = self._truncate(*self._tokenize_segments(segments, sample_id), sample_id, need_labels=True)
        return encoded

    def encode_prompt(self, messages: list[dict[str, str]], sample_id: str = "?") -> Encoded:
        """A prompt ending in a user turn, followed by the template's generation prefix."""
        if messages[-1]["role"] != "user":
            raise SampleError(sample_id, "messages", "a generation prompt must end with a user turn")
        self.check_text_lengths(messages, sample_id)
        segments = self._segments(messages, sample_id, add_generation_prompt=True)
        ids, labels = self._tokenize_segments(segments, sample_id)
        if len(ids) > self.max_length:
            # Cutting a prompt would drop the generation prefix ("ASSISTANT:") and the model would continue
            # the question instead of answering it.
            raise SampleError(sample_id, "messages", f"prompt has {len(ids)} tokens, more than max_length="
                                                     f"{self.max_length}; it cannot be truncated without losing "
                                                     f"the generation prompt")
        return Encoded(ids, labels)

    def _segments(self, messages: list[dict[str, str]], sample_id: str, add_generation_prompt: bool) -> list[Segment]:
        try:
            return self.template.segments(messages, eos=self.eos, bos=self.tokenizer.bos_token or "",
                                          add_generation_prompt=add_generation_prompt)
        except ValueError as err:
            raise SampleError(sample_id, "messages", str(err)) from None

    def decode(self, token_ids: list[int] | torch.Tensor) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()

    # ------------------------------------------------------------------ images
    def preprocess_image(self, image: bytes | Image.Image, sample_id: str = "?", field_name: str = "images",
                         normalize: bool = True) -> torch.Tensor:
        """Decode, pad to square with the mean colour, resize (bicubic) and normalise -> (3, S, S) float32.

        `normalize=False` stops before normalising and returns uint8 (what the data encoders ship from
        loader workers; the model normalises on its device, `vlsafe.core.vision.normalize_pixels`)."""
        if not isinstance(image, Image.Image):
            if not isinstance(image, (bytes, bytearray)):
                raise SampleError(sample_id, field_name, f"expected encoded image bytes, got {type(image).__name__}")
            # shards written with `make_shards --presize` (PPM) hold the final pixels: no decoder, no resize
            pixels = presized_pixels(bytes(image), Presize.for_processor(self), sample_id, field_name)
            if pixels is not None:
                return self.normalize(pixels) if normalize else pixels
            # max_side: huge or extremely elongated images are reduced before padding to a square
            image = decode_image(bytes(image), sample_id, field_name, max_side=self.image_size,
                                 rgb_mode=self.rgb_mode)
            # shards written with `make_shards --presize` must match this processor (else: resized twice)
            check_presized(image, Presize.for_processor(self), sample_id, field_name)
        # pad to square with the mean colour (truncated, as LLaVA does) and resize: a no-op when pre-sized
        image = square_image(to_rgb(image, self.rgb_mode), self.image_size, self.pad_fill, self.pad_to_square)
        pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
        # `.contiguous()`: channels-first memory; arithmetic over the permuted view was 3x slower
        pixels = pixels.view(self.image_size, self.image_size, 3).permute(2, 0, 1).contiguous()
        return self.normalize(pixels) if normalize else pixels

    @property
    def pad_fill(self) -> tuple[int, int, int]:
        """RGB of the square padding: `pad_color` "mean" (LLaVA: the normalisation mean, truncated), "white"
        (Shikra / PerceptionGPT's `Expand2square`) or three integers 0..255."""
        return pad_fill(self.pad_color, self.image_mean)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 images from `preprocess_image(normalize=False)` -> what `preprocess_image` returns."""
        return normalize_pixels(pixels, self.image_mean, self.image_std)

    def preprocess_images(self, images: list[bytes], sample_id: str = "?", normalize: bool = True) -> torch.Tensor:
        """(n, 3, S, S): float32 normalised, or uint8 with `normalize=False`."""
        if not images:
            dtype = torch.float32 if normalize else torch.uint8
            return torch.zeros(0, 3, self.image_size, self.image_size, dtype=dtype)
        return torch.stack([self.preprocess_image(img, sample_id, f"images[{i}]", normalize)
                            for i, img in enumerate(images)])

    # ------------------------------------------------------------------ batching
    def pad(self, sequences: list[list[int]], value: int, side: str = "right") -> torch.Tensor:
        """Pad lists of ids to one tensor; `side='left'` is what batched generation needs."""
        if side not in ("left", "right"):
            raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
        width = max(len(s) for s in sequences)
        out = torch.full((len(sequences), width), value, dtype=torch.long)
        for row, seq in enumerate(sequences):
            if side == "right":
                out[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            elif seq:
                out[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        return out

    def collate_text(self, input_ids: list[list[int]], labels: list[list[int]] | None = None,
                     side: str = "right") -> dict[str, torch.Tensor]:
        batch = {"input_ids": self.pad(input_ids, self.pad_token_id, side),
                 "attention_mask": self.pad([[1] * len(s) for s in input_ids], 0, side)}
        if labels is not None:
            batch["labels"] = self.pad(labels, IGNORE_INDEX, side)
        return batch


def pad_fill(pad_color: str | tuple[int, int, int] | list[int], image_mean: tuple[float, ...]) -> tuple[int, int, int]:
    """`pad_color` ("mean", "white" or an RGB triple of 0..255 integers) -> the RGB fill of `expand2square`."""
    if pad_color == "mean":
        return mean_fill(image_mean)
    if pad_color == "white":
        return (255, 255, 255)
    if (isinstance(pad_color, (tuple, list)) and len(pad_color) == 3
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in pad_color)):
        return tuple(pad_color)  # type: ignore[return-value]
    raise ValueError(f"pad_color must be 'mean', 'white' or three integers in 0..255, got {pad_color!r}")


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    """Encode a PIL image (handy for tests and converters)."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()
