"""Guarded serving: an OpenAI-compatible chat-completions server whose every answer passes MLLM-Protector's guard.

- `app.create_app(backend, guard, settings)`: the FastAPI app (routes, response schema, errors);
- `batcher.Batcher`: bounded queue + batching of concurrent requests (429 full, 503 closing, 504 timeout);
- `backends.LocalBackend` (a vlsafe checkpoint or llava-hf folder) / `backends.UpstreamBackend` (another
  OpenAI-compatible server);
- `guard.AnswerGuard`: harm detector + detoxifier or fixed refusal (`vlsafe.methods.protector`);
- `inputs`: request schema, image data URLs / URLs, size limits; `runner`: uvicorn in the foreground or a thread.

`vlsafe serve` (vlsafe/serving/cli.py) is the command; docs/serving.md the guide. FastAPI and uvicorn come with
the `serve` extra (`pip install -e ".[serve]"`).
"""
