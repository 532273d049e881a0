"""From an OpenAI chat-completions body to vlsafe messages and image bytes, within the server's limits.

The request schema is pydantic (unknown fields are kept, so the upstream forwarder can pass them on). Image
parts become `<image>` placeholders at the start of their turn, LLaVA's convention (`move_image_first`), and
their bytes are checked here, before any model work: size of the encoded data, pixel count from the header,
then a full decode, so one broken or oversized image is a 4xx for its own request and never fails a batch.
"""
from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vlsafe.constants import IMAGE_PLACEHOLDER
from vlsafe.data.images import open_image
from vlsafe.data.schema import SampleError
from vlsafe.serving.errors import ServingError, bad_request, too_large


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each breach is a 413 (size) or 400 (max_tokens, image count)."""

    max_body_bytes: int = 32 * 2**20        # the whole JSON body, as received
    max_image_bytes: int = 8 * 2**20        # one image, decoded from base64 or fetched
    max_image_pixels: int = 4096 * 4096     # one image, width x height from its header
    max_images: int = 4                     # per request
    max_text_chars: int = 32_000            # all text parts of all messages together
    max_tokens: int = 1024                  # answer length cap (the released guard's VLM length) and default
    image_fetch_timeout_s: float = 10.0     # http(s) image URLs, when allowed


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="allow")
    url: str
    detail: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat-completions body that this server reads; others are kept as extras."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1)
    stream: bool | None = None
    stop: str | list[str] | None = None


@dataclass
class ParsedRequest:
    """A validated request: vlsafe messages with `<image>` placeholders, the images' bytes, the question the
    guard scores (the last user turn without its images, as `tools/guard.py` takes it) and the answer cap."""

    request: ChatRequest
    messages: list[dict[str, str]]
    images: list[bytes]
    question: str
    max_tokens: int
    stop: list[str] = field(default_factory=list)


def parse_body(data: Any) -> ChatRequest:
    """Validate a decoded JSON body; the first schema error becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"{where}: {first['msg']}", "invalid_value", param=where) from None


def parse_request(request: ChatRequest, limits: Limits, allow_image_urls: bool = False) -> ParsedRequest:
    """Messages and images of `request`, every limit checked. Blocking (decodes, may fetch): run it in a thread."""
    max_tokens = request.max_completion_tokens or request.max_tokens or limits.max_tokens
    if max_tokens > limits.max_tokens:
        raise bad_request(f"max_tokens {max_tokens} exceeds this server's limit of {limits.max_tokens}",
                          "max_tokens_too_large", "max_tokens")
    if request.messages[-1].role != "user":
        raise bad_request("the last message must come from the user", "invalid_value", "messages")
    # cheap checks first: no image is decoded or fetched for a request that is refused anyway
    if sum(len(part.text or "") for message in request.messages for part in _parts(message)) > limits.max_text_chars:
        raise too_large(f"the messages hold more than {limits.max_text_chars} characters of text", "text_too_long",
                        "messages")
    if sum(part.type == "image_url" for message in request.messages for part in _parts(message)) > limits.max_images:
        raise bad_request(f"more than {limits.max_images} images in one request", "too_many_images", "messages")
    messages: list[dict[str, str]] = []
    images: list[bytes] = []
    for i, message in enumerate(request.messages):
        role = "system" if message.role == "developer" else message.role
        texts, count = [], 0
        for j, part in enumerate(_parts(message)):
            where = f"messages[{i}].content" + ("" if isinstance(message.content, str) else f"[{j}]")
            if part.type == "text":
                text = part.text or ""
                if IMAGE_PLACEHOLDER in text:
                    raise bad_request(f"{where}: the text contains the literal {IMAGE_PLACEHOLDER!r}, which this "
                                      f"model reads as an image slot; send images as image_url parts",
                                      "invalid_value", where)
                texts.append(text)
            else:
                if role != "user":
                    raise bad_request(f"{where}: images are accepted in user messages only", "invalid_value", where)
                if part.image_url is None:
                    raise bad_request(f"{where}: an image_url part needs an image_url.url", "invalid_value", where)
                images.append(load_image(part.image_url.url, where, limits, allow_image_urls))
                count += 1
        text = "\n".join(texts)
        messages.append({"role": role, "content": "\n".join([IMAGE_PLACEHOLDER] * count + ([text] if text else []))})
    question = "\n".join(part.text or "" for part in _parts(request.messages[-1]) if part.type == "text")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return ParsedRequest(request, messages, images, question.strip(), max_tokens, stop)


def _parts(message: Message) -> list[ContentPart]:
    """A message's content as parts (a plain string is one text part)."""
    if isinstance(message.content, str):
        return [ContentPart(type="text", text=message.content)]
    return list(message.content or [])


def load_image(url: str, where: str, limits: Limits, allow_urls: bool) -> bytes:
    """Bytes of a `data:` URL, or of an http(s) URL fetched when `allow_urls`; decoded once to check them."""
    if url.startswith("data:"):
        head, sep, payload = url.partition(",")
        if not sep or not head.endswith(";base64"):
            raise bad_request(f"{where}: a data URL must be base64 (data:image/...;base64,...)", "invalid_image", where)
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise too_large(f"{where}: the image is over {limits.max_image_bytes} bytes", "image_too_large", where)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as err:
            raise bad_request(f"{where}: the data URL is not valid base64 ({err})", "invalid_image", where) from None
    elif url.startswith(("http://", "https://")):
        if not allow_urls:
            raise bad_request(f"{where}: this server does not fetch image URLs (start it with --allow-image-urls); "
                              f"send the image as a data URL", "image_url_not_allowed", where)
        data = fetch_image(url, where, limits)
    else:
        raise bad_request(f"{where}: image URLs must be data: URLs (or http(s) with --allow-image-urls)",
                          "invalid_image", where)
    check_image(data, where, limits)
    return data


def fetch_image(url: str, where: str, limits: Limits) -> bytes:
    """GET `url` with a timeout, reading at most `max_image_bytes` + 1 bytes (a larger body is a 413)."""
    try:
        with urllib.request.urlopen(url, timeout=limits.image_fetch_timeout_s) as response:
            data = response.read(limits.max_image_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise bad_request(f"{where}: fetching {url} failed: {err}", "image_fetch_failed", where) from None
    if len(data) > limits.max_image_bytes:
        raise too_large(f"{where}: the image at {url} is over {limits.max_image_bytes} bytes", "image_too_large",
                        where)
    return data


def check_image(data: bytes, where: str, limits: Limits) -> None:
    """Refuse an image over the pixel limit from its header alone (413), and one that does not decode (400)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size
    except Image.DecompressionBombError:
        width = height = limits.max_image_pixels + 1  # far over PIL's own limit: over ours too
    except Exception as err:  # noqa: BLE001 (PIL raises many types for data that is not an image)
        raise bad_request(f"{where}: the image does not decode ({err})", "invalid_image", where) from None
    if width * height > limits.max_image_pixels:
        raise too_large(f"{where}: the image has {width}x{height} pixels, over the limit of {limits.max_image_pixels}",
                        "image_too_large", where)
    try:
        open_image(data, "request", where)
    except SampleError as err:
        raise bad_request(f"{where}: {err.problem}", "invalid_image", where) from None


__all__ = ["ChatRequest", "Limits", "ParsedRequest", "ServingError", "load_image", "parse_body", "parse_request"]
