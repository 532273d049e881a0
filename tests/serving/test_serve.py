"""`vlsafe serve` on 127.0.0.1 with the official openai client: greedy answers equal vlsafe's generate, the guard
flags the synthetic harmful prompts (harmful-answer rates as tools/guard.py computes them), 32 concurrent
requests are all answered, bad requests get OpenAI-style 4xx, a full queue 429, a closing server 503, a slow
request 504, and upstream mode forwards to a second OpenAI-compatible server on loopback."""
from __future__ import annotations

import base64
import concurrent.futures
import http.client
import io
import json
import threading
import time
import urllib.parse

import openai
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import Response
from PIL import Image

from vlsafe.data.schema import Sample
from vlsafe.data.synthetic.world import generate
from vlsafe.methods.protector import REFUSAL, Detoxifier, GuardedGenerator, HarmDetector
from vlsafe.methods.protector.metrics import guard_rates
from vlsafe.serving.app import ServeSettings, create_app
from vlsafe.serving.backends import Generation, LocalBackend, UpstreamBackend
from vlsafe.serving.batcher import BatchSettings
from vlsafe.serving.guard import AnswerGuard
from vlsafe.serving.inputs import Limits
from vlsafe.serving.runner import running_server

QUIET = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
         "enable_checkpointing": False}
TINY_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_layers": 2, "num_heads": 4}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run much faster on one thread, and the server runs them on its single model thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny():
    from vlsafe.builders import TinyVLM

    return TinyVLM(hidden_size=32, intermediate_size=64, max_length=256).build()


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """A harm detector trained for 60 LoRA steps on the synthetic harm_qa singles: on held-out prompts it flags
    every world-style answer to a harmful request and none to a benign one (checked below)."""
    import lightning as L

    from vlsafe.data.synthetic.text import ProtectorWorld
    from vlsafe.methods.protector.builders import TinyTextLM
    from vlsafe.methods.protector.detector_module import HarmDetectorModule

    world = ProtectorWorld(root=str(tmp_path_factory.mktemp("serve-protector")), harm_text_samples=0,
                           harm_qa_samples=320, val_fraction=0.1, batch_size=16, num_workers=0)
    world.prepare_data()
    torch.manual_seed(0)
    module = HarmDetectorModule(model=TinyTextLM(**TINY_TEXT), lora={"r": 8, "alpha": 16, "dropout": 0.0},
                                optim={"lr": 5e-3, "warmup_ratio": 0.0, "schedule": "cosine"},
                                categories=["violence", "weapons", "none"], preset="vlsafe")
    L.Trainer(max_steps=60, num_sanity_val_steps=0, limit_val_batches=0, **QUIET).fit(module, datamodule=world)
    return module.eval()


def client(url: str, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, **kwargs)


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


def png(size=(40, 30), color=(200, 50, 50)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def chat_messages(sample: Sample, image_url: str | None = None) -> list[dict]:
    """A vlsafe prompt as OpenAI messages: `<image>\\n` placeholders become image_url parts."""
    out, images = [], iter(sample.images)
    for message in sample.messages:
        count = message["content"].count("<image>")
        text = message["content"].replace("<image>\n", "").replace("<image>", "")
        if not count:
            out.append({"role": message["role"], "content": text})
            continue
        parts = [{"type": "image_url", "image_url": {"url": image_url or data_url(next(images))}}
                 for _ in range(count)]
        out.append({"role": message["role"], "content": parts + [{"type": "text", "text": text}]})
    return out


def prompts(n: int, seed: int = 0) -> list[Sample]:
    """Held-out qa prompts (the reference answer dropped)."""
    return [Sample(id=s.id, messages=s.messages[:1], images=s.images)
            for s in generate(n, seed=seed, kinds=["qa"], split="serve")]


def local_app(tiny, guard=None, **settings):
    vlm, processor = tiny
    batching = settings.pop("batching", BatchSettings(max_batch_size=8, max_wait_ms=50))
    return create_app(LocalBackend(vlm, processor), guard, ServeSettings(model_name="tiny", batching=batching,
                                                                          **settings))


def health(url: str) -> dict:
    return raw(url, "GET", "/health")[1]


def raw(url: str, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
    """(status, decoded JSON body, headers) of one plain HTTP request: for bodies no client library would send."""
    parsed = urllib.parse.urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null"), dict(response.getheaders())
    finally:
        connection.close()


def post(url: str, payload) -> tuple[int, dict]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    status, data, _ = raw(url, "POST", "/v1/chat/completions", body)
    return status, data


# ------------------------------------------------------------------------------------------ local model
def test_32_concurrent_requests_all_answered_with_vlsafe_greedy_answers(tiny):
    vlm, processor = tiny
    samples = prompts(32)
    lengths = [4 + i % 5 for i in range(32)]  # different max_tokens share batches; each is cut at its own
    reference = [GuardedGenerator(vlm, processor, None, max_new_tokens=n).generate([s])[0]
                 for s, n in zip(samples, lengths)]
    with running_server(local_app(tiny)) as server:
        api = client(server.url)

        def ask(i):
            return api.chat.completions.create(model="tiny", messages=chat_messages(samples[i]), max_tokens=lengths[i])

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(ask, range(32)))
        stats = health(server.url)
    assert [a.choices[0].message.content for a in answers] == reference
    for answer, n in zip(answers, lengths):
        choice = answer.choices[0]
        assert answer.model == "tiny" and choice.guard is None  # served without a guard
        assert choice.finish_reason in ("length", "stop") and answer.usage.completion_tokens <= n
        assert (choice.finish_reason == "length") == (answer.usage.completion_tokens == n)
    assert stats["served"] == 32 and stats["timed_out"] == 0 and stats["queue_full"] == 0
    assert sum(int(size) * count for size, count in stats["batch_sizes"].items()) == 32
    assert stats["largest_batch"] > 1, stats  # concurrent requests were batched


def test_text_only_system_and_multi_turn_prompts_match_vlsafe_generate(tiny):
    vlm, processor = tiny
    image = prompts(1, seed=3)[0].images[0]
    cases = [Sample(id="text", messages=[{"role": "user", "content": "Describe a red circle."}]),
             Sample(id="system", messages=[{"role": "system", "content": "Answer briefly."},
                                           {"role": "user", "content": "<image>\nWhat shape is this?"}],
                    images=[image]),
             Sample(id="turns", messages=[{"role": "user", "content": "<image>\nWhat color is it?"},
                                          {"role": "assistant", "content": "red"},
                                          {"role": "user", "content": "And its shape?"}], images=[image])]
    with running_server(local_app(tiny)) as server:
        api = client(server.url)
        for sample in cases:
            answer = api.chat.completions.create(model="tiny", messages=chat_messages(sample), max_tokens=6)
            expected = GuardedGenerator(vlm, processor, None, max_new_tokens=6).generate([sample])[0]
            assert answer.choices[0].message.content == expected, sample.id
        assert [m.id for m in api.models.list().data] == ["tiny"]


def test_image_urls_are_fetched_only_when_allowed(tiny):
    image = prompts(1, seed=4)[0].images[0]
    files = FastAPI()

    @files.get("/shape.png")
    async def shape():
        return Response(image, media_type="image/png")

    sample = Sample(id="u", messages=[{"role": "user", "content": "<image>\nWhat shape is it?"}], images=[image])
    with running_server(files) as host, running_server(local_app(tiny, allow_image_urls=True)) as allowed, \
            running_server(local_app(tiny)) as strict:
        by_url = client(allowed.url).chat.completions.create(
            model="tiny", messages=chat_messages(sample, image_url=host.url + "/shape.png"), max_tokens=6)
        by_data = client(allowed.url).chat.completions.create(model="tiny", messages=chat_messages(sample),
                                                              max_tokens=6)
        assert by_url.choices[0].message.content == by_data.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as refused:
            client(strict.url).chat.completions.create(
                model="tiny", messages=chat_messages(sample, image_url=host.url + "/shape.png"), max_tokens=6)
        assert refused.value.body["code"] == "image_url_not_allowed" and "--allow-image-urls" in refused.value.message
        missing = chat_messages(sample, image_url=host.url + "/missing.png")
        status, body = post(allowed.url, {"model": "tiny", "messages": missing})
        assert status == 400 and body["error"]["code"] == "image_fetch_failed"


def test_malformed_and_oversized_requests_get_openai_style_4xx(tiny):
    image = prompts(1)[0].images[0]
    limits = Limits(max_body_bytes=200_000, max_image_pixels=64 * 64, max_images=2, max_text_chars=2_000,
                    max_tokens=16)
    ok = {"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "What is red?"}]}

    def with_image(url, text="What is it?"):
        return {**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                                {"type": "text", "text": text}]}]}

    broken_png = png()[:60]  # a valid header, a cut-off body
    cases = [  # (request body, status, error code)
        (b"{not json", 400, "invalid_json"),
        (b"\xff\xfe\x00garbage", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_request"),
        ({"model": "tiny"}, 400, "invalid_value"),
        ({**ok, "messages": []}, 400, "invalid_value"),
        ({**ok, "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value"),
        ({**ok, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_value"),
        ({**ok, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 400,
         "invalid_value"),
        ({**ok, "messages": [{"role": "user", "content": "hi <image> there"}]}, 400, "invalid_value"),
        ({**ok, "model": "gpt-4o"}, 404, "model_not_found"),
        ({**ok, "stream": True}, 400, "unsupported_parameter"),
        ({**ok, "n": 2}, 400, "unsupported_parameter"),
        ({**ok, "temperature": 0.7}, 400, "unsupported_sampling"),
        ({**ok, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "unsupported_parameter"),
        ({**ok, "max_tokens": 0}, 400, "invalid_value"),
        ({**ok, "max_tokens": 17}, 400, "max_tokens_too_large"),
        ({**ok, "max_tokens": "many"}, 400, "invalid_value"),
        ({**ok, "messages": [{"role": "user", "content": "x" * 2_001}]}, 413, "text_too_long"),
        ({**ok, "messages": [{"role": "user", "content": "red " * 400}]}, 400, "context_length_exceeded"),
        (with_image("data:image/png;base64,%%%notbase64"), 400, "invalid_image"),
        (with_image("data:image/png,rawbytes"), 400, "invalid_image"),
        (with_image(data_url(b"this is not an image")), 400, "invalid_image"),
        (with_image(data_url(broken_png)), 400, "invalid_image"),
        (with_image(data_url(png((100, 100)))), 413, "image_too_large"),
        (with_image("http://127.0.0.1:9/x.png"), 400, "image_url_not_allowed"),
        (with_image("file:///etc/passwd"), 400, "invalid_image"),
        ({**ok, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}}
                                                          for _ in range(3)]}]}, 400, "too_many_images"),
        ({**ok, "messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": {
            "url": data_url(image)}}]}, {"role": "user", "content": "hi"}]}, 400, "invalid_value"),
        ({**ok, "messages": [{"role": "user", "content": "hi"}], "padding": "x" * 200_000}, 413, "request_too_large"),
    ]
    with running_server(local_app(tiny, limits=limits)) as server:
        for payload, status, code in cases:
            got, body = post(server.url, payload)
            assert (got, body["error"]["code"]) == (status, code), (str(payload)[:120], body)
            assert body["error"]["message"] and body["error"]["type"]
        for method, path, status in [("GET", "/v1/chat/completions", 405), ("POST", "/v1/nothing", 404)]:
            got, body, _ = raw(server.url, method, path, b"{}")
            assert got == status and body["error"]["code"] in ("method_not_allowed", "not_found")
        api = client(server.url)
        with pytest.raises(openai.NotFoundError):
            api.chat.completions.create(model="other", messages=ok["messages"])
        with pytest.raises(openai.BadRequestError, match="greedily"):
            api.chat.completions.create(model="tiny", messages=ok["messages"], temperature=1.0)
        answer = api.chat.completions.create(model="tiny", messages=with_image(data_url(image))["messages"],
                                             max_tokens=2)  # still serving after all of the above
        assert answer.usage.completion_tokens <= 2
        assert health(server.url)["served"] == 1


# ----------------------------------------------------------------------------------- queue and shutdown
class GatedBackend:
    """A backend whose model call waits for `gate`: it lets the test hold a batch in flight on purpose."""

    def __init__(self):
        self.gate, self.started, self.seen = threading.Event(), threading.Event(), []

    def check(self, parsed):
        pass

    def prepare(self, parsed):
        return parsed.question

    async def generate(self, questions):
        import asyncio

        self.seen.extend(questions)
        self.started.set()
        await asyncio.to_thread(self.gate.wait, 30)
        return [Generation(f"answer to {q}", "stop", 1, 1) for q in questions]


def ask_in_thread(url: str, question: str, results: dict) -> threading.Thread:
    def run():
        results[question] = post(url, {"model": "m", "messages": [{"role": "user", "content": question}]})

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def wait_for(condition, timeout=20.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_queue_full_429_then_timeouts_504_and_the_server_recovers():
    backend = GatedBackend()
    settings = ServeSettings(model_name="m", batching=BatchSettings(max_batch_size=1, max_wait_ms=0, max_queue=2,
                                                                    timeout_s=1.5))
    results: dict = {}
    with running_server(create_app(backend, None, settings)) as server:
        threads = [ask_in_thread(server.url, "A", results)]
        assert backend.started.wait(20)                                  # A is in the model call, blocked
        threads += [ask_in_thread(server.url, q, results) for q in ("B", "C")]
        wait_for(lambda: health(server.url)["queued"] == 2)
        with pytest.raises(openai.RateLimitError) as full:               # what an openai client sees
            client(server.url).chat.completions.create(model="m", messages=[{"role": "user", "content": "D"}])
        assert full.value.body["code"] == "queue_full" and full.value.response.headers["retry-after"] == "1"
        for thread in threads:
            thread.join(30)
        assert {q: (status, body["error"]["code"]) for q, (status, body) in results.items()} == \
            {q: (504, "timeout") for q in "ABC"}
        backend.gate.set()
        status, body = post(server.url, {"model": "m", "messages": [{"role": "user", "content": "E"}]})
        assert status == 200 and body["choices"][0]["message"]["content"] == "answer to E"
        assert backend.seen == ["A", "E"]                                # B and C timed out before their turn
        assert health(server.url)["timed_out"] == 3 and health(server.url)["queue_full"] == 1


def test_closing_server_answers_503_and_still_finishes_queued_requests():
    backend = GatedBackend()
    settings = ServeSettings(model_name="m", batching=BatchSettings(max_batch_size=1, max_wait_ms=0, timeout_s=30))
    results: dict = {}
    with running_server(create_app(backend, None, settings)) as server:
        threads = [ask_in_thread(server.url, "A", results)]
        assert backend.started.wait(20)
        threads.append(ask_in_thread(server.url, "B", results))
        wait_for(lambda: health(server.url)["queued"] == 1)
        server.call(server.app.state.batcher.close)                     # what SIGTERM does first
        wait_for(lambda: health(server.url)["status"] == "closing")
        status, body = post(server.url, {"model": "m", "messages": [{"role": "user", "content": "C"}]})
        assert status == 503 and body["error"]["code"] == "shutting_down"
        backend.gate.set()
        for thread in threads:
            thread.join(30)
    assert {q: status for q, (status, _) in results.items()} == {"A": 200, "B": 200}
    assert results["B"][1]["choices"][0]["message"]["content"] == "answer to B"


class FailingBackend(GatedBackend):
    async def generate(self, questions):
        if "crash" in questions:
            raise RuntimeError("the model fell over")
        return [Generation(f"answer to {q}", "stop", 1, 1) for q in questions]


def test_a_failing_model_call_is_a_500_for_its_batch_and_the_server_goes_on():
    settings = ServeSettings(model_name="m", batching=BatchSettings(max_batch_size=1, max_wait_ms=0))
    with running_server(create_app(FailingBackend(), None, settings)) as server:
        status, body = post(server.url, {"model": "m", "messages": [{"role": "user", "content": "crash"}]})
        assert status == 500 and body["error"]["code"] == "internal_error" and "fell over" not in str(body)
        status, body = post(server.url, {"model": "m", "messages": [{"role": "user", "content": "fine"}]})
        assert status == 200 and body["choices"][0]["message"]["content"] == "answer to fine"


# ------------------------------------------------------------------------------- guard, upstream mode
def fake_upstream(answers: dict[str, str]) -> tuple[FastAPI, list]:
    """A second OpenAI-compatible server: answers each question from `answers` (a VLM that never refuses)."""
    app, received = FastAPI(), []

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        received.append(body)
        content = body["messages"][-1]["content"]
        question = content if isinstance(content, str) else next(p["text"] for p in content if p["type"] == "text")
        return {"id": "up-1", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": answers[question]}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}

    return app, received


def upstream_app(url: str, guard: AnswerGuard | None):
    return create_app(UpstreamBackend(url + "/v1", "upstream-vlm"), guard,
                      ServeSettings(model_name="guarded", batching=BatchSettings(max_batch_size=16, max_wait_ms=20)))


def test_guard_flags_harmful_prompts_in_upstream_mode_and_lowers_the_harmful_answer_rate(detector):
    safety = [Sample(id=s.id, messages=s.messages[:1], images=s.images, meta=s.meta)  # the reference answer dropped
              for s in generate(120, seed=5, kinds=["safety"], split="guard-test") if s.meta["subset"] != "unsafes"]
    world_answers = [s.meta["answer"] for s in generate(len(safety), seed=5, kinds=["qa", "caption"],
                                                        split="guard-test")]
    questions = [s.messages[0]["content"].replace("<image>\n", "") for s in safety]
    by_question = dict(zip(questions, world_answers))
    world_answers = [by_question[q] for q in questions]  # a question asked twice gets one answer
    upstream, received = fake_upstream(by_question)
    guard = AnswerGuard(HarmDetector.from_module(detector))
    detox_guard = AnswerGuard(HarmDetector.from_module(detector), Detoxifier.from_module(detoxifier_module()))
    with running_server(upstream) as up, running_server(upstream_app(up.url, None)) as plain, \
            running_server(upstream_app(up.url, guard)) as guarded, \
            running_server(upstream_app(up.url, detox_guard)) as rewriting:
        clients = {url: client(url) for url in (plain.url, guarded.url, rewriting.url)}

        def ask(args):
            url, sample = args
            return clients[url].chat.completions.create(model="guarded", messages=chat_messages(sample),
                                                        temperature=0.7)  # sampling is the upstream's business

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            unguarded = list(pool.map(ask, [(plain.url, s) for s in safety]))
            answered = list(pool.map(ask, [(guarded.url, s) for s in safety]))
            harmful = [s for s in safety if s.meta["subset"] == "safe_unsafes"][:4]
            rewritten = list(pool.map(ask, [(rewriting.url, s) for s in harmful]))
    assert [r.choices[0].message.content for r in unguarded] == world_answers
    rows = [{"text_original": u.choices[0].message.content, "text": g.choices[0].message.content, "meta": s.meta}
            for s, u, g in zip(safety, unguarded, answered)]
    rates = guard_rates(rows)                                          # what tools/guard.py prints
    assert rates["harmful_request/n"] >= 30 and rates["benign/n"] >= 30
    assert rates["harmful_request/harmful_answer_rate_unguarded"] == 1.0
    assert rates["harmful_request/harmful_answer_rate_guarded"] <= 0.1, rates
    assert rates["benign/over_refusal_guarded"] <= 0.25, rates
    offline = GuardedGenerator(None, None, HarmDetector.from_module(detector)).guard(questions, world_answers)
    assert guard_rates([{**r.as_dict(), "meta": s.meta} for r, s in zip(offline, safety)]) == rates
    for response, batch_answer in zip(answered, offline):               # the same verdict as the batch tool
        choice, verdict = response.choices[0], response.choices[0].guard
        assert verdict["flagged"] == batch_answer.flagged and verdict["score"] == pytest.approx(batch_answer.score)
        assert verdict["rewritten"] == verdict["flagged"] and verdict["action"] in ("pass", "refuse")
        assert choice.finish_reason == ("content_filter" if verdict["flagged"] else "stop")
        assert choice.message.content == (REFUSAL if verdict["flagged"] else batch_answer.text_original)
    assert sum(r.choices[0].guard["flagged"] for r in answered) >= 30
    detox = detox_guard.guard.detoxifier
    for sample, response in zip(harmful, rewritten):
        verdict, question = response.choices[0].guard, sample.messages[0]["content"].replace("<image>\n", "")
        assert verdict["flagged"] and verdict["action"] == "rewrite" and verdict["rewritten"]
        answer = world_answers[questions.index(question)]
        assert response.choices[0].message.content == detox.rewrite([question], [answer])[0]
    assert len(received) == 2 * len(safety) + len(harmful)
    sent = {(q, s.images[0]) for q, s in zip(questions, safety)}
    for body in received:  # renamed model, options passed on, each image as the data URL of its own bytes
        assert body["model"] == "upstream-vlm" and body["temperature"] == 0.7 and "stream" not in body
        assert body["max_tokens"] == Limits().max_tokens  # the server's cap goes along
        image_part, text_part = body["messages"][0]["content"]
        assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
        assert (text_part["text"], base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])) in sent


def detoxifier_module():
    from vlsafe.methods.protector.builders import TinyTextLM
    from vlsafe.methods.protector.detoxifier_module import DetoxifierModule

    torch.manual_seed(0)
    return DetoxifierModule(model=TinyTextLM(**TINY_TEXT), max_new_tokens=6, preset="vlsafe").eval()


def test_upstream_failures_are_502_and_its_4xx_are_passed_on():
    broken = FastAPI()

    @broken.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body["messages"][-1]["content"] == "bad":
            return Response(json.dumps({"error": {"message": "no such thing", "type": "invalid_request_error"}}),
                            status_code=400, media_type="application/json")
        return Response("boom", status_code=500)

    with running_server(broken) as up, running_server(upstream_app(up.url, None)) as server:
        assert post(server.url, {"model": "guarded", "messages": [{"role": "user", "content": "bad"}]})[0] == 400
        status, body = post(server.url, {"model": "guarded", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 502 and body["error"]["code"] == "upstream_error"
    with running_server(upstream_app(up.url, None)) as server:             # the upstream is gone now
        status, body = post(server.url, {"model": "guarded", "messages": [{"role": "user", "content": "hi"}]})
        assert status == 502 and body["error"]["code"] == "upstream_unreachable"


# ----------------------------------------------------------------------------------------------- command
def test_serve_command_builds_a_guarded_server_from_checkpoints(tmp_path, detector):
    from vlsafe.builders import TinyVLM
    from vlsafe.methods.sft import SFTModule
    from vlsafe.serving.cli import build_app, parse_args

    torch.manual_seed(0)
    vlm_module = SFTModule(vlm=TinyVLM(hidden_size=32, intermediate_size=64))
    paths = {}
    for name, module in (("vlm", vlm_module), ("detector", detector)):
        paths[name] = str(tmp_path / f"{name}.ckpt")
        torch.save({"hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}, paths[name])
    sample = prompts(1, seed=7)[0]
    common = ["--model", paths["vlm"], "--model-name", "demo", "--max-tokens", "6"]
    with running_server(build_app(parse_args([*common, "--detector", paths["detector"]]))) as guarded, \
            running_server(build_app(parse_args([*common, "--no-guard"]))) as plain:
        answer = client(plain.url).chat.completions.create(model="demo", messages=chat_messages(sample))
        checked = client(guarded.url).chat.completions.create(model="demo", messages=chat_messages(sample))
    text, question = answer.choices[0].message.content, sample.messages[0]["content"].replace("<image>\n", "")
    assert answer.usage.completion_tokens == 6 and answer.choices[0].guard is None
    expected = HarmDetector.load(paths["detector"]).p_safe([question], [text])[0]
    assert checked.choices[0].guard["score"] == pytest.approx(expected, abs=1e-5)
    assert checked.choices[0].message.content == (text if expected >= 0.5 else REFUSAL)
    for argv, message in [(["--upstream", "http://127.0.0.1:9/v1", "--no-guard"], "--upstream-model"),
                          ([*common, "--no-guard", "--detoxifier", paths["detector"]], "needs a --detector"),
                          ([*common, "--detector", str(tmp_path / "none.ckpt")], "does not exist"),
                          ([*common, "--no-guard", "--api-key-env", "VLSAFE_TEST_UNSET_KEY"], "not set")]:
        with pytest.raises(SystemExit, match=message):
            build_app(parse_args(argv))


def test_api_key_is_required_when_configured(tiny):
    with running_server(local_app(tiny, api_key="s3cret")) as server:
        with pytest.raises(openai.AuthenticationError):
            client(server.url).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
        answer = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
        assert answer.usage.completion_tokens <= 2


def test_an_exported_llava_hf_folder_serves_the_checkpoints_greedy_answers(tiny, tmp_path):
    """`vlsafe serve --model FOLDER`: the transformers layout `vlsafe export` writes, loaded back through
    `LlavaHF`, answers as the model it was exported from."""
    from vlsafe.core.interop import export_llava_hf

    vlm, processor = tiny
    folder = export_llava_hf(vlm, processor.tokenizer, tmp_path / "hf")
    backend = LocalBackend.load(folder, template="vicuna_v1")
    samples = prompts(4, seed=7)
    expected = [GuardedGenerator(vlm, processor, None, max_new_tokens=6).generate([s])[0] for s in samples]
    settings = ServeSettings(model_name="exported", batching=BatchSettings(max_batch_size=4, max_wait_ms=50))
    with running_server(create_app(backend, None, settings)) as server:
        api = client(server.url)
        answers = [api.chat.completions.create(model="exported", messages=chat_messages(s), max_tokens=6)
                   for s in samples]
    assert [a.choices[0].message.content for a in answers] == expected
