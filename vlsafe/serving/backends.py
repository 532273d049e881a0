"""Where answers come from: a vlsafe VLM in this process (`LocalBackend`) or another OpenAI-compatible server
(`UpstreamBackend`). Both take a batch of validated requests and return one `Generation` per request (or a
`ServingError` for that request alone); the guard runs on whatever they return.

`prepare` runs per request in a worker thread before queueing (tokenising, image preprocessing), so a request
that cannot be encoded fails alone with a 4xx; `generate` runs once per batch.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlsafe.data.encoding.encoders import PromptEncoder
from vlsafe.data.schema import Sample, SampleError
from vlsafe.serving.errors import ServingError, bad_request
from vlsafe.serving.inputs import ParsedRequest

#: options a local greedy model cannot honour; a request that sets one gets a 400 instead of a silent ignore
UNSUPPORTED_LOCAL = ("tools", "tool_choice", "functions", "function_call", "response_format", "logprobs",
                     "top_logprobs", "logit_bias", "audio", "modalities", "prediction", "presence_penalty",
                     "frequency_penalty")


@functools.lru_cache(maxsize=1)
def model_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread that runs model code (VLM, detector, detoxifier): torch work is never interleaved, and the
    event loop stays free to accept and queue requests meanwhile."""
    return concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="vlsafe-model")


@dataclass
class Generation:
    """One answer before the guard: `finish_reason` is "stop" (EOS or a stop string) or "length"."""

    text: str
    finish_reason: str
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


@dataclass
class _Prompt:
    encoded: dict[str, Any]
    max_tokens: int
    stop: list[str]


class LocalBackend:
    """A vlsafe VLM answering greedily; one batched `VLM.generate` (left padding, KV cache) per batch.

    A batch runs to the largest `max_tokens` in it and each answer is cut at its own: greedy decoding makes
    that the answer the request would get alone. Prompts are encoded exactly as `GuardedGenerator.generate`
    (tools/guard.py) and `tools/evaluate.py` encode them (`PromptEncoder`)."""

    def __init__(self, vlm: torch.nn.Module, processor: Any, device: str | torch.device = "cpu"):
        self.vlm, self.processor, self.device = vlm.eval().to(device), processor, torch.device(device)
        self.encoder = PromptEncoder(processor)
        self._encoding = threading.Lock()  # one tokenizer, many request threads: encode one prompt at a time

    @classmethod
    def load(cls, path: str | Path, template: str | None = None, device: str = "cpu",
             torch_dtype: str | None = None) -> LocalBackend:
        """A vlsafe training checkpoint (`.ckpt`, its own template) or an exported llava-hf folder (`template`,
        default vicuna_v1, LLaVA-1.5's)."""
        from vlsafe.builders import FromCheckpoint, LlavaHF

        path = Path(path)
        if path.is_file():
            if template is not None:
                raise ValueError(f"--template applies to llava-hf folders; {path} is a checkpoint and brings its "
                                 f"own template")
            vlm, processor = FromCheckpoint(str(path)).build()
        elif path.is_dir():
            vlm, processor = LlavaHF(str(path), template=template or "vicuna_v1", torch_dtype=torch_dtype).build()
        else:
            raise FileNotFoundError(f"--model {path} does not exist")
        return cls(vlm, processor, device)

    def check(self, parsed: ParsedRequest) -> None:
        """Refuse sampling and options this greedy model cannot honour (400), rather than ignore them."""
        request = parsed.request
        if request.temperature not in (None, 0) or request.top_p not in (None, 1):
            raise bad_request("this server decodes greedily (as the guard's evaluation does): send temperature 0 "
                              "or leave temperature and top_p out", "unsupported_sampling", "temperature")
        extras = request.model_extra or {}
        for name in UNSUPPORTED_LOCAL:
            if extras.get(name) not in (None, False, 0, [], {}, "text", {"type": "text"}):
                raise bad_request(f"{name} is not supported by a local vlsafe model", "unsupported_parameter", name)

    def prepare(self, parsed: ParsedRequest) -> _Prompt:
        sample = Sample(id="request", messages=parsed.messages, images=parsed.images)
        try:
            sample.validate()
            with self._encoding:
                encoded = self.encoder.encode(sample)
        except SampleError as err:
            code = "context_length_exceeded" if "max_length" in err.problem else "invalid_prompt"
            raise bad_request(f"{err.field_name}: {err.problem}", code, "messages") from None
        return _Prompt(encoded, parsed.max_tokens, parsed.stop)

    async def generate(self, prompts: Sequence[_Prompt]) -> list[Generation]:
        return await asyncio.get_running_loop().run_in_executor(model_executor(), self.generate_now, prompts)

    @torch.no_grad()
    def generate_now(self, prompts: Sequence[_Prompt]) -> list[Generation]:
        batch = self.encoder.collate([p.encoded for p in prompts])
        eos = self.processor.tokenizer.eos_token_id
        new_tokens = self.vlm.generate(batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device),
                                       batch["pixel_values"].to(self.device),
                                       max_new_tokens=max(p.max_tokens for p in prompts), do_sample=False,
                                       pad_token_id=self.processor.pad_token_id, eos_token_id=eos)
        out = []
        for prompt, row in zip(prompts, new_tokens.tolist()):
            row = row[:prompt.max_tokens]
            finish = "length"
            if eos in row:
                row, finish = row[:row.index(eos)], "stop"
            text = self.processor.decode(row)
            cut = [text.index(s) for s in prompt.stop if s and s in text]
            if cut:
                text, finish = text[:min(cut)].strip(), "stop"
            out.append(Generation(text, finish, len(prompt.encoded["input_ids"]), len(row)))
        return out


def data_url(image: bytes) -> str:
    """An image as a base64 data URL with its real MIME type (what OpenAI-compatible servers expect)."""
    fmt = (Image.open(io.BytesIO(image)).format or "png").lower()
    return f"data:image/{fmt};base64,{base64.b64encode(image).decode('ascii')}"


class UpstreamBackend:
    """Forward each request of a batch to an OpenAI-compatible server (concurrently) and return its answers.

    The body is passed on as received (sampling options included) with the model renamed to `model` and
    every image sent as a checked data URL, so the upstream never fetches a URL itself."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout_s: float = 120.0):
        self.base_url, self.model, self.api_key, self.timeout_s = base_url, model, api_key, timeout_s
        self._client: Any = None

    def check(self, parsed: ParsedRequest) -> None:
        """Sampling options are the upstream's business."""

    def prepare(self, parsed: ParsedRequest) -> dict[str, Any]:
        body = parsed.request.model_dump(exclude_none=True)
        body["model"] = self.model
        body.pop("stream", None)
        if "max_completion_tokens" not in body:
            body["max_tokens"] = parsed.max_tokens  # the server's cap (--max-tokens) holds upstream too
        images = iter(parsed.images)
        for message in body["messages"]:
            if message["role"] == "developer":
                message["role"] = "system"
            for part in message.get("content") if isinstance(message.get("content"), list) else []:
                if part["type"] == "image_url":
                    part["image_url"]["url"] = data_url(next(images))
        return body

    def client(self) -> Any:
        if self._client is None:  # made inside the server's event loop, which its connections belong to
            from openai import AsyncOpenAI

            self._client = AsyncOpenAI(base_url=self.base_url, api_key=self.api_key or "none", max_retries=0,
                                       timeout=self.timeout_s)
        return self._client

    async def generate(self, bodies: Sequence[dict[str, Any]]) -> list[Generation | ServingError]:
        return list(await asyncio.gather(*(self._one(body) for body in bodies)))

    async def _one(self, body: dict[str, Any]) -> Generation | ServingError:
        import openai

        extra = {k: v for k, v in body.items() if k not in ("model", "messages")}
        try:
            completion = await self.client().chat.completions.create(model=body["model"], messages=body["messages"],
                                                                     extra_body=extra)
        except openai.APITimeoutError:
            return ServingError(504, f"the upstream server {self.base_url} did not answer within {self.timeout_s:g} s",
                                "upstream_timeout", "upstream_error")
        except openai.APIStatusError as err:
            if err.status_code in (400, 413, 422, 429):  # the request itself (or the upstream's load): say so
                return ServingError(err.status_code, f"upstream: {err.message}", "upstream_rejected",
                                    "invalid_request_error" if err.status_code != 429 else "rate_limit_error")
            return ServingError(502, f"the upstream server answered {err.status_code}: {err.message}",
                                "upstream_error", "upstream_error")
        except openai.APIError as err:
            return ServingError(502, f"the upstream server {self.base_url} could not be reached: {err}",
                                "upstream_unreachable", "upstream_error")
        if not completion.choices:
            return ServingError(502, "the upstream server returned no choices", "upstream_error", "upstream_error")
        choice = completion.choices[0]
        usage = completion.usage
        return Generation(choice.message.content or "", choice.finish_reason or "stop",
                          usage.prompt_tokens if usage else None, usage.completion_tokens if usage else None)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
