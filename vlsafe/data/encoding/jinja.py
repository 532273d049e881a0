"""vlsafe's conversation templates as Jinja `chat_template`s, for exported tokenizers and processors.

An exported model is prompted by other software (transformers' `apply_chat_template`, vLLM, TGI, lmms-eval)
through the Jinja template its tokenizer carries. Each template here renders, character for character, what
`ChatTemplate.prompt_text` renders for the same conversation (checked by tests/scale/test_export_templates.py),
so a served model sees the prompt it was trained on.

Messages may hold a string (`"<image>\\nWhat is this?"`, vlsafe's form) or a list of parts
(`[{"type": "image"}, {"type": "text", "text": "What is this?"}]`, the OpenAI/transformers form). A list is
written the way vlsafe's converters write a turn (`move_image_first`): one image token per image part, each on
its own line, then the text parts (joined by a space, stripped).
"""
from __future__ import annotations

from vlsafe.data.encoding.templates import (
    LLAMA2_SYSTEM,
    LLAVA_SYSTEM,
    VICUNA_SYSTEM,
    ChatTemplate,
    get_template,
)

_CONTENT_MACRO = """\
{%- macro content_text(content) -%}
  {%- if content is string -%}
    {{- content -}}
  {%- else -%}
    {%- set ns = namespace(parts=[]) -%}
    {%- for part in content if part['type'] == 'image' -%}
      {%- set ns.parts = ns.parts + [IMAGE_TOKEN] -%}
    {%- endfor -%}
    {%- set text = content | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') | trim -%}
    {%- if text -%}
      {%- set ns.parts = ns.parts + [text] -%}
    {%- endif -%}
    {{- ns.parts | join('\\n') -}}
  {%- endif -%}
{%- endmacro -%}
"""

_SPLIT_SYSTEM = """\
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set system = content_text(messages[0]['content']) -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set system = DEFAULT_SYSTEM -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- if message['role'] != ['user', 'assistant'][loop.index0 % 2] -%}
    {{- raise_exception('TEMPLATE_NAME: turn ' ~ loop.index0 ~ ' has role ' ~ message['role'] ~ ', expected '
                        ~ ['user', 'assistant'][loop.index0 % 2]
                        ~ ' (conversations alternate user/assistant after an optional system turn)') -}}
  {%- endif -%}
{%- endfor -%}
"""

_BOS = "{%- if ADD_BOS -%}{{- bos_token -}}{%- endif -%}\n"

# LLaVA-1.5 SeparatorStyle.TWO (`render_vicuna`): `{system} USER: {q} ASSISTANT: {a}</s>USER: ...`
_VICUNA_BODY = """\
{{- system ~ ' ' -}}
{%- for message in turns -%}
  {%- if message['role'] == 'user' -%}
    {{- 'USER: ' ~ content_text(message['content']) ~ ' ' -}}
  {%- else -%}
    {{- 'ASSISTANT: ' ~ content_text(message['content']) ~ eos_token -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}
"""

# Llama-2 chat (`render_llama2`): `[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{q} [/INST] {a} </s><s>[INST] ...`
_LLAMA2_BODY = """\
{%- for message in turns -%}
  {%- if message['role'] == 'user' -%}
    {%- if not loop.first -%}{{- bos_token -}}{%- endif -%}
    {{- '[INST] ' -}}
    {%- if loop.first and system -%}{{- '<<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n' -}}{%- endif -%}
    {{- content_text(message['content']) ~ ' [/INST]' -}}
  {%- else -%}
    {{- ' ' ~ content_text(message['content']) ~ ' ' ~ eos_token -}}
  {%- endif -%}
{%- endfor -%}
"""

# LLaVA stage-1 `plain` (`render_plain`): the user turn (just the image) then the caption and a newline.
_PLAIN_BODY = """\
{%- for message in turns -%}
  {%- if message['role'] == 'user' -%}
    {{- content_text(message['content']) -}}
  {%- else -%}
    {{- content_text(message['content']) ~ '\\n' -}}
  {%- endif -%}
{%- endfor -%}
"""

_BODIES: dict[str, tuple[str, str]] = {  # template name -> (default system prompt, body)
    "vicuna_v1": (VICUNA_SYSTEM, _VICUNA_BODY),
    "llava_v1": (LLAVA_SYSTEM, _VICUNA_BODY),
    "llama2": (LLAMA2_SYSTEM, _LLAMA2_BODY),
    "plain": ("", _PLAIN_BODY),
}


def _jinja_string(text: str) -> str:
    """A Python string as a Jinja string literal (single-quoted, backslashes and quotes escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def has_jinja_form(template: str | ChatTemplate) -> bool:
    return get_template(template).name in _BODIES


def jinja_chat_template(template: str | ChatTemplate, *, add_bos: bool, image_token: str = "<image>") -> str:
    """The Jinja `chat_template` that renders what `template` renders, with the BOS text first when the model
    was trained with a BOS (`VLMProcessor.add_bos`). `image_token` is what an image part of a message becomes.

    The BOS is part of the rendered text (as in Llama's own templates), so `processor.apply_chat_template(...,
    tokenize=True)` and `tokenizer.apply_chat_template(..., tokenize=True)` add no second one; text rendered with
    `tokenize=False` must be tokenised with `add_special_tokens=False`.
    """
    chat = get_template(template)
    if chat.name not in _BODIES:
        raise ValueError(f"conversation template {chat.name!r} has no Jinja form for export; templates with one: "
                         f"{sorted(_BODIES)}")
    system, body = _BODIES[chat.name]
    source = (_CONTENT_MACRO + _SPLIT_SYSTEM + _BOS + body)
    return (source.replace("IMAGE_TOKEN", _jinja_string(image_token))
                  .replace("DEFAULT_SYSTEM", _jinja_string(system))
                  .replace("TEMPLATE_NAME", chat.name)
                  .replace("ADD_BOS", "true" if add_bos else "false"))
