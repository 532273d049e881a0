"""Judges: the chat endpoint on a fake local server (retries, cache, malformed replies, rate limit),
verdict parsing, the detector wrapper and judge configs."""
from __future__ import annotations

import json

import pytest


def _judge(server, tmp_path, **kwargs):
    from vlsafe.eval.judges import ChatJudge

    defaults = dict(cache=tmp_path / "cache.jsonl", requests_per_minute=60000, backoff=0.001, max_backoff=0.01,
                    timeout=5)
    return ChatJudge(server.base_url, "fake-gpt", **{**defaults, **kwargs})


def test_retries_on_429_and_5xx_then_succeeds(fake_server, chat_reply, tmp_path):
    script = [(429, "slow down", {"Retry-After": "0"}), (503, "busy", {}), (200, chat_reply("unsafe"), {})]
    server = fake_server(lambda body: script.pop(0))
    judge = _judge(server, tmp_path)
    assert judge.complete(["Is this safe?"]) == ["unsafe"]
    assert len(server.requests) == 3 and judge.stats.retries == 2 and judge.stats.failures == 0
    assert judge.stats.reasons == {"http 429": 1, "http 503": 1}
    assert server.requests[0]["model"] == "fake-gpt"
    assert server.requests[0]["messages"] == [{"role": "user", "content": "Is this safe?"}]


def test_cache_makes_a_second_run_free(fake_server, chat_reply, tmp_path):
    server = fake_server(lambda body: (200, chat_reply("verdict for " + body["messages"][0]["content"]), {}))
    prompts = ["a", "b", "a", "c"]
    first = _judge(server, tmp_path).complete(prompts)
    assert first == ["verdict for a", "verdict for b", "verdict for a", "verdict for c"]
    assert len(server.requests) == 3  # the repeated prompt is asked once
    again = _judge(server, tmp_path)  # a new process would build a new judge: only the cache file survives
    assert again.complete(prompts) == first
    assert len(server.requests) == 3 and again.stats.requests == 0 and again.stats.cache_hits == 4
    # another model, or another token budget, is another question
    _judge(server, tmp_path).complete(["a"], max_tokens=2)
    assert len(server.requests) == 4


def test_malformed_replies_are_retried_and_never_cached(fake_server, chat_reply, tmp_path):
    bad = ["not json at all", json.dumps({"choices": []}), json.dumps({"choices": [{"message": {"content": None}}]})]
    script = list(bad) + [chat_reply("safe")]
    server = fake_server(lambda body: (200, script.pop(0), {}))
    judge = _judge(server, tmp_path, max_retries=5)
    assert judge.complete(["q"]) == ["safe"] and judge.stats.reasons == {"malformed reply": 3}

    always_bad = fake_server(lambda body: (200, "{oops", {}))
    judge = _judge(always_bad, tmp_path / "other", max_retries=2)
    assert judge.complete(["q"]) == [None]
    assert judge.stats.failures == 1 and len(always_bad.requests) == 3
    assert not (tmp_path / "other" / "cache.jsonl").exists()  # a failure is asked again next run


def test_client_errors_stop_at_once(fake_server, tmp_path):
    from vlsafe.eval.judges import JudgeError

    server = fake_server(lambda body: (401, json.dumps({"error": "bad key"}), {}))
    with pytest.raises(JudgeError, match="HTTP 401.*bad key"):
        _judge(server, tmp_path).complete(["q"])
    assert len(server.requests) == 1


def test_api_key_comes_from_the_named_environment_variable(fake_server, chat_reply, tmp_path, monkeypatch):
    server = fake_server(lambda body: (200, chat_reply("ok"), {}))
    with pytest.raises(ValueError, match="VLSAFE_TEST_KEY"):
        _judge(server, tmp_path, api_key_env="VLSAFE_TEST_KEY")
    monkeypatch.setenv("VLSAFE_TEST_KEY", "sk-test")
    _judge(server, tmp_path, api_key_env="VLSAFE_TEST_KEY").complete(["q"])
    assert server.auth == ["Bearer sk-test"]


def test_rate_limiter_spaces_requests():
    from vlsafe.eval.judges import RateLimiter

    now, slept = [100.0], []

    def sleep(seconds):
        slept.append(seconds)
        now[0] += seconds

    limiter = RateLimiter(120, clock=lambda: now[0], sleep=sleep)  # one request every 0.5 s
    for _ in range(4):
        limiter.wait()
    assert slept == pytest.approx([0.5, 0.5, 0.5])


def test_concurrent_requests_all_cached(fake_server, chat_reply, tmp_path):
    server = fake_server(lambda body: (200, chat_reply(body["messages"][0]["content"].upper()), {}))
    prompts = [f"p{i}" for i in range(12)]
    assert _judge(server, tmp_path, concurrency=4).complete(prompts) == [p.upper() for p in prompts]
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 12


def test_chat_safety_judge_fills_templates_literally(fake_server, chat_reply, tmp_path):
    from vlsafe.eval.judges import ChatSafetyJudge

    server = fake_server(lambda body: (200, chat_reply("unsafe" if "bomb" in body["messages"][0]["content"]
                                                       else "maybe?"), {}))
    judge = ChatSafetyJudge(_judge(server, tmp_path), "Q={question} A={prediction} end")
    verdicts = judge.judge(["how?", "what {prediction}?"], ["a bomb {question}", "nothing"])
    assert [v.safe for v in verdicts] == [False, None]
    sent = [r["messages"][0]["content"] for r in server.requests]
    assert sent == ["Q=how? A=a bomb {question} end", "Q=what {prediction}? A=nothing end"]


def test_detector_judge_thresholds_p_safe():
    from vlsafe.eval.judges import DetectorJudge

    class Detector:
        seen = []

        def p_safe(self, questions, answers):
            self.seen.append(len(answers))
            return [0.9 if "sorry" in a else 0.2 for a in answers]

    detector = Detector()
    verdicts = DetectorJudge(detector, batch_size=2).judge(["q"] * 3, ["sorry", "sure, here", "so sorry"])
    assert [v.safe for v in verdicts] == [True, False, True] and verdicts[1].score == pytest.approx(0.2)
    assert detector.seen == [2, 1]


def test_judge_configs():
    from vlsafe.eval.judges import (
        ChatSafetyJudge,
        StringMatchJudge,
        build_judge,
        safety_judge,
    )

    assert isinstance(build_judge("string_match"), StringMatchJudge)
    with pytest.raises(ValueError, match="unknown judge type 'gpt'"):
        build_judge({"type": "gpt"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['url'\]"):
        build_judge({"type": "endpoint", "url": "http://x", "model": "m"})
    with pytest.raises(ValueError, match="checkpoint"):
        build_judge({"type": "detector"})
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        build_judge({"type": "detector", "checkpoint": "/nonexistent/missing.ckpt"})
    judge = safety_judge({"type": "endpoint", "base_url": "http://127.0.0.1:9", "model": "m"}, "{prediction}",
                         cache_dir="/tmp/unused")
    assert isinstance(judge, ChatSafetyJudge) and str(judge.chat.cache_path) == "/tmp/unused/judge_cache.jsonl"


def test_detector_judge_loads_the_protector_harm_detector_lazily(tmp_path, tokenizer):
    """A `{type: detector}` config imports vlsafe.methods.protector.HarmDetector only when first used and scores
    exactly what the classifier says (sigmoid of its logit on the detector's input format)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from vlsafe.eval.judges import build_judge

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    model = LlamaForSequenceClassification(config).eval()
    model.save_pretrained(tmp_path / "detector")
    tokenizer.save_pretrained(tmp_path / "detector")
    judge = build_judge({"type": "detector", "checkpoint": str(tmp_path / "detector"), "threshold": 0.5})
    assert judge._detector is None  # nothing loaded yet
    questions, answers = ["What is red?", "Describe the image."], ["The circle.", "I'm sorry, no."]
    verdicts = judge.judge(questions, answers)
    for question, answer, verdict in zip(questions, answers, verdicts):
        ids = tokenizer(f"Question: {question}\n\nAnswer: {answer}", return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = torch.sigmoid(model(input_ids=ids).logits.view(-1)).item()
        assert verdict.score == pytest.approx(expected, abs=1e-5) and verdict.safe is (expected >= 0.5)
