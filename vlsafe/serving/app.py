"""The FastAPI app: OpenAI's `/v1/chat/completions` (plus `/v1/models`, `/health`), every answer guarded.

A request is checked (auth, body size, JSON, schema, model name, options), its images decoded and limited and
its prompt encoded in a worker thread, then queued for the batcher; the batch is answered by the backend and the
guard checks every answer before any of it is returned. The response is an ordinary chat completion plus a
`guard` object in the choice, `{flagged, score, rewritten, action, threshold}` (`null` on a server started with
--no-guard); a flagged answer is replaced and its `finish_reason` is "content_filter", OpenAI's value for an
answer its filter changed. Every error is OpenAI's error body (`vlsafe.serving.errors`).
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from vlsafe.serving.backends import Generation
from vlsafe.serving.batcher import (
    Batcher,
    BatchSettings,
    QueueFull,
    RequestTimeout,
    ShuttingDown,
)
from vlsafe.serving.errors import ServingError, bad_request, too_large
from vlsafe.serving.guard import AnswerGuard, verdict
from vlsafe.serving.inputs import Limits, ParsedRequest, parse_body, parse_request

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the app needs of a backend (`LocalBackend`, `UpstreamBackend`)."""

    def check(self, parsed: ParsedRequest) -> None: ...

    def prepare(self, parsed: ParsedRequest) -> Any: ...

    async def generate(self, prepared: Sequence[Any]) -> Sequence[Generation | ServingError]: ...


@dataclass(frozen=True)
class ServeSettings:
    """Everything about the server except the backend and the guard."""

    model_name: str
    limits: Limits = field(default_factory=Limits)
    batching: BatchSettings = field(default_factory=BatchSettings)
    allow_image_urls: bool = False
    api_key: str | None = None      # when set, requests need `Authorization: Bearer <api_key>`
    drain_s: float = 30.0           # at shutdown, how long queued requests may take to finish


@dataclass
class _Work:
    prepared: Any
    question: str


def create_app(backend: Backend, guard: AnswerGuard | None, settings: ServeSettings) -> FastAPI:
    """The app for `backend`, guarded by `guard` (None: unguarded, for comparisons)."""

    async def process(work: Sequence[_Work]) -> list[Any]:
        generations = list(await backend.generate([w.prepared for w in work]))
        answered = [i for i, g in enumerate(generations) if isinstance(g, Generation)]
        verdicts: dict[int, Any] = {}
        if guard is not None and answered:
            checked = await guard.check([work[i].question for i in answered], [generations[i].text for i in answered])
            verdicts = dict(zip(answered, checked))
        return [g if isinstance(g, Exception) else (g, verdicts.get(i)) for i, g in enumerate(generations)]

    batcher = Batcher(process, settings.batching)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.loop = asyncio.get_running_loop()
        batcher.start()
        yield
        await batcher.drain(settings.drain_s)
        closer = getattr(backend, "aclose", None)
        if closer is not None:
            await closer()

    app = FastAPI(title="vlsafe: guarded OpenAI-compatible chat completions", lifespan=lifespan)
    app.state.batcher, app.state.settings, app.state.guard = batcher, settings, guard

    @app.exception_handler(ServingError)
    async def serving_error(request: Request, err: ServingError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return JSONResponse(ServingError(err.status_code, str(err.detail), code).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("request to %s failed", request.url.path)
        body = ServingError(500, f"internal error ({type(err).__name__}; the server log has the details)",
                            "internal_error", "server_error")
        return JSONResponse(body.body(), status_code=500)

    def check_auth(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise ServingError(401, "missing or wrong API key (Authorization: Bearer ...)", "invalid_api_key",
                               "authentication_error")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> JSONResponse:
        arrived = time.monotonic()
        check_auth(request)
        raw = await read_body(request, settings.limits.max_body_bytes)
        try:
            data = json.loads(raw)
        except ValueError as err:
            raise bad_request(f"the request body is not valid JSON: {err}", "invalid_json") from None
        chat = parse_body(data)
        if chat.model != settings.model_name:
            raise ServingError(404, f"model {chat.model!r} is not served here; this server serves "
                                    f"{settings.model_name!r}", "model_not_found", param="model")
        if chat.stream:
            raise bad_request("streaming is not supported: the guard reads the whole answer before any of it is "
                              "sent", "unsupported_parameter", "stream")
        if chat.n not in (None, 1):
            raise bad_request("n must be 1: each answer is guarded on its own", "unsupported_parameter", "n")
        parsed = await asyncio.to_thread(parse_request, chat, settings.limits, settings.allow_image_urls)
        backend.check(parsed)
        prepared = await asyncio.to_thread(backend.prepare, parsed)
        left = settings.batching.timeout_s - (time.monotonic() - arrived)
        try:
            generation, answer = await batcher.submit(_Work(prepared, parsed.question), max(left, 0.001))
        except QueueFull as err:
            raise ServingError(429, f"{err}; retry shortly", "queue_full", "rate_limit_error",
                               headers={"Retry-After": "1"}) from None
        except ShuttingDown as err:
            raise ServingError(503, str(err), "shutting_down", "server_error") from None
        except RequestTimeout as err:
            raise ServingError(504, f"{err} (the server's per-request timeout)", "timeout", "server_error") from None
        return JSONResponse(completion(settings.model_name, generation, answer,
                                       guard.threshold if guard is not None else None))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "vlsafe"}]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "closing" if batcher.closing else "ok", "model": settings.model_name,
                "guard": guard.mode if guard is not None else None, "queued": batcher.queued,
                **batcher.stats.as_dict()}

    return app


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over `limit` bytes (declared or received)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(f"the request body has {declared} bytes, over the limit of {limit}", "request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"the request body is over the limit of {limit} bytes", "request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def completion(model: str, generation: Generation, answer: Any, threshold: float | None) -> dict[str, Any]:
    """An OpenAI chat.completion body; `answer` is the guard's `GuardedAnswer` (None when unguarded)."""
    text = answer.text if answer is not None else generation.text
    rewritten = answer is not None and answer.action != "pass"
    usage = None
    if generation.prompt_tokens is not None and generation.completion_tokens is not None:
        usage = {"prompt_tokens": generation.prompt_tokens, "completion_tokens": generation.completion_tokens,
                 "total_tokens": generation.prompt_tokens + generation.completion_tokens}
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
              "finish_reason": "content_filter" if rewritten else generation.finish_reason,
              "guard": verdict(answer, threshold) if answer is not None else None}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage}
