"""Conversation templates as lists of (text, supervised) segments.

Rendering to segments instead of one string is what makes label masking exact: the processor marks a
token as supervised when its characters overlap a supervised segment, so no LLaVA-style token-count
arithmetic (and none of its off-by-one quirks) is needed. Supervised text is each assistant reply plus
the end-of-turn marker (what LLaVA-1.5 trains on), starting right after the generation prompt.

The template's own BOS/EOS are `SpecialToken` strings: the processor turns exactly those into the special ids
and reads everything else (messages, system prompts) as plain text, so a literal `</s>` in an answer stays text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from vlsafe.constants import IMAGE_PLACEHOLDER

Segment = tuple[str, bool]


class SpecialToken(str):
    """A special token the template itself places (BOS/EOS). It renders as its text; the processor encodes it
    as the special id. Text from the conversation is never a `SpecialToken`, whatever it contains."""


VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAMA2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual "
                 "content that the user provides, and assist the user with a variety of tasks using natural "
                 "language.")


def _split_system(messages: list[dict[str, str]], default: str) -> tuple[str, list[dict[str, str]]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return default, messages


def _check_alternation(turns: list[dict[str, str]], template: str) -> None:
    for i, turn in enumerate(turns):
        expected = "user" if i % 2 == 0 else "assistant"
        if turn["role"] != expected:
            raise ValueError(f"template {template!r}: turn {i} has role {turn['role']!r}, expected {expected!r} "
                             f"(conversations alternate user/assistant after an optional system turn)")


def render_vicuna(messages: list[dict[str, str]], eos: str, bos: str, add_generation_prompt: bool,
                  system: str = VICUNA_SYSTEM) -> list[Segment]:
    """LLaVA-1.5 `vicuna_v1`: `{system} USER: {q} ASSISTANT: {a}</s>USER: ...` (SeparatorStyle.TWO)."""
    system, turns = _split_system(messages, system)
    _check_alternation(turns, "vicuna_v1")
    segments: list[Segment] = [(system + " ", False)]
    for turn in turns:
        if turn["role"] == "user":
            segments.append((f"USER: {turn['content']} ", False))
        else:
            # Supervision starts right after the generation prompt "ASSISTANT:", so the separator space
            # (a token of its own in byte-level BPEs) is learned too and inference sees what training saw.
            segments += [("ASSISTANT:", False), (" " + turn["content"], True), (SpecialToken(eos), True)]
    if add_generation_prompt:
        segments.append(("ASSISTANT:", False))
    return segments


def render_llava_v1(messages: list[dict[str, str]], eos: str, bos: str, add_generation_prompt: bool) -> list[Segment]:
    """LLaVA's `llava_v1` (VLGuard's eval template): vicuna_v1 with "curious human" in the system prompt."""
    return render_vicuna(messages, eos, bos, add_generation_prompt, system=LLAVA_SYSTEM)


def render_llama2(messages: list[dict[str, str]], eos: str, bos: str, add_generation_prompt: bool) -> list[Segment]:
    """Llama-2 chat: `[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{q} [/INST] {a} </s><s>[INST] ...`."""
    system, turns = _split_system(messages, LLAMA2_SYSTEM)
    _check_alternation(turns, "llama2")
    segments: list[Segment] = []
    for i, turn in enumerate(turns):
        if turn["role"] == "user":
            if i > 0:
                segments.append((SpecialToken(bos), False))
            header = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if i == 0 and system else ""
            segments.append((f"[INST] {header}{turn['content']} [/INST]", False))
        else:
            segments += [(f" {turn['content']} ", True), (SpecialToken(eos), True)]
    return segments


def render_plain(messages: list[dict[str, str]], eos: str, bos: str, add_generation_prompt: bool) -> list[Segment]:
    """LLaVA stage-1 `plain`: the user turn (just `<image>`) followed by the caption and a newline."""
    _, turns = _split_system(messages, "")
    _check_alternation(turns, "plain")
    segments: list[Segment] = []
    for turn in turns:
        if turn["role"] == "user":
            segments.append((turn["content"], False))
        else:
            segments.append((turn["content"] + "\n", True))
    return segments


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    render: Callable[..., list[Segment]]

    def segments(self, messages: list[dict[str, str]], *, eos: str, bos: str = "",
                 add_generation_prompt: bool = False) -> list[Segment]:
        return self.render(messages, eos, bos, add_generation_prompt)

    def prompt_text(self, messages: list[dict[str, str]], *, eos: str, bos: str = "",
                    add_generation_prompt: bool = True) -> str:
        """The rendered string, for logs and for comparing with other implementations."""
        return "".join(text for text, _ in self.segments(messages, eos=eos, bos=bos,
                                                          add_generation_prompt=add_generation_prompt))


TEMPLATES: dict[str, ChatTemplate] = {
    "vicuna_v1": ChatTemplate("vicuna_v1", render_vicuna),
    "llava_v1": ChatTemplate("llava_v1", render_llava_v1),
    "llama2": ChatTemplate("llama2", render_llama2),
    "plain": ChatTemplate("plain", render_plain),
}


def get_template(name: str | ChatTemplate) -> ChatTemplate:
    if isinstance(name, ChatTemplate):
        return name
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown conversation template {name!r}; available: {sorted(TEMPLATES)}") from None


def move_image_first(text: str) -> str:
    """LLaVA convention: a turn that mentions `<image>` starts with `<image>\\n` and has no other copy."""
    if IMAGE_PLACEHOLDER not in text:
        return text
    count = text.count(IMAGE_PLACEHOLDER)
    rest = text.replace(IMAGE_PLACEHOLDER, "").strip()
    return "\n".join([IMAGE_PLACEHOLDER] * count + ([rest] if rest else []))
