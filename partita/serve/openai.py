"""OpenAI-compatible text generation over a `Generator`: POST /v1/completions and /v1/chat/completions.

Routes (Starlette; `partita serve hf:PATH` mounts them beside the v2 health probes):

- `GET /v1/models`: the one model served.
- `POST /v1/completions`: `{"prompt": str, "max_tokens", "temperature", "top_p", "seed", "stream"}`.
- `POST /v1/chat/completions`: `{"messages": [{"role", "content"}], ...}`; the messages are joined
  as "role: content" lines, or rendered with the tokenizer's chat template when it has one.

With `"stream": true` the answer is server-sent events, one `data: {chunk}` per token and a final
`data: [DONE]`, as OpenAI's clients expect. Errors are `{"error": {"message", "type"}}` with 400
(bad request), 401 (missing or wrong API key) or 500 (generation failed). Defaults: max_tokens 16,
temperature 1 (OpenAI's), top_p 1; temperature 0 is greedy.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from partita.errors import PartitaError
from partita.runtime.generate import Generation, Sampling, Token

MAX_BODY_BYTES = 1 << 20


class BadRequest(Exception):
    """A request answered with 400 and this message."""


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status)


class OpenAIRoutes:
    """The /v1 routes over one `Generator` named `model`; `api_key` None: no key needed."""

    def __init__(self, generator: Any, model: str, api_key: str | None = None) -> None:
        self.generator = generator
        self.model = model
        self.api_key = api_key

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
        ]

    async def models(self, request: Request) -> Response:
        if (denied := self._guard(request)) is not None:
            return denied
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "partita"}]})

    async def completions(self, request: Request) -> Response:
        return await self._answer(request, chat=False)

    async def chat(self, request: Request) -> Response:
        return await self._answer(request, chat=True)

    # -- internals ------------------------------------------------------------------------------
    def _guard(self, request: Request) -> JSONResponse | None:
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", "authentication_error")
        return None

    async def _answer(self, request: Request, *, chat: bool) -> Response:
        if (denied := self._guard(request)) is not None:
            return denied
        try:
            body = await request.body()
            if len(body) > MAX_BODY_BYTES:
                raise BadRequest(f"the body is over {MAX_BODY_BYTES} bytes")
            try:
                data = json.loads(body)
            except ValueError as exc:
                raise BadRequest(f"the body is not JSON: {exc}") from None
            if not isinstance(data, dict):
                raise BadRequest("the body must be a JSON object")
            prompt = self._prompt(data, chat=chat)
            sampling = _sampling(data)
            sampling.check()
        except (BadRequest, PartitaError) as exc:
            return _error(400, str(exc), "invalid_request_error")
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if data.get("stream"):
            return StreamingResponse(self._stream(prompt, sampling, ident, chat=chat), media_type="text/event-stream")
        try:
            result = await run_in_threadpool(self._generate, prompt, sampling)
        except PartitaError as exc:
            return _error(400 if "prompt" in str(exc) else 500, str(exc), "generation_error")
        return JSONResponse(self._full(result, ident, chat=chat))

    def _prompt(self, data: dict, *, chat: bool) -> str:
        if not chat:
            prompt = data.get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise BadRequest("'prompt' must be a non-empty string")
            return prompt
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise BadRequest("'messages' must be a non-empty list of {role, content} strings")
        tokenizer = self.generator.tokenizer
        if getattr(tokenizer, "chat_template", None):
            return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

    def _generate(self, prompt: str, sampling: Sampling) -> Generation:
        return self.generator.generate_many([prompt], sampling)[0]

    def _full(self, result: Generation, ident: str, *, chat: bool) -> dict:
        usage = {"prompt_tokens": len(result.prompt_ids), "completion_tokens": len(result.token_ids),
                 "total_tokens": len(result.prompt_ids) + len(result.token_ids)}
        finish = "stop" if result.finish == "eos" else "length"
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text}, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": finish, "logprobs": None}
        return {"id": ident, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model, "choices": [choice], "usage": usage}

    async def _stream(self, prompt: str, sampling: Sampling, ident: str, *, chat: bool) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        end = object()

        def produce() -> None:
            try:
                for event in self.generator.stream_many([prompt], sampling):
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except PartitaError as exc:
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, end)

        threading.Thread(target=produce, name="openai-stream", daemon=True).start()
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        if chat:
            yield _sse({"id": ident, "object": kind, "created": created, "model": self.model,
                        "choices": [{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}]})
        while (event := await queue.get()) is not end:
            if isinstance(event, PartitaError):
                yield _sse({"error": {"message": str(event), "type": "generation_error"}})
                continue
            if isinstance(event, Token):
                piece = {"delta": {"content": event.text}} if chat else {"text": event.text}
                yield _sse({"id": ident, "object": kind, "created": created, "model": self.model,
                            "choices": [{"index": 0, **piece, "finish_reason": None}]})
            elif isinstance(event, Generation):
                last: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
                yield _sse({"id": ident, "object": kind, "created": created, "model": self.model,
                            "choices": [{"index": 0, **last,
                                         "finish_reason": "stop" if event.finish == "eos" else "length"}]})
        yield b"data: [DONE]\n\n"


def _sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def _sampling(data: dict) -> Sampling:
    def number(key: str, default: float) -> float:
        value = data.get(key, default)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise BadRequest(f"'{key}' must be a number")
        return float(value)

    max_tokens = data.get("max_tokens", data.get("max_completion_tokens", 16))
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise BadRequest("'max_tokens' must be a whole number")
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise BadRequest("'seed' must be a whole number")
    return Sampling(max_new_tokens=max_tokens, temperature=number("temperature", 1.0), top_p=number("top_p", 1.0),
                    seed=seed)


def create_openai_app(generator: Any, model: str, *, api_key: str | None = None) -> Any:
    """A Starlette app: the /v1 routes and the v2 health probes (live; ready while the generator runs)."""
    from starlette.applications import Starlette

    async def live(request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(request: Request) -> Response:
        return JSONResponse({"ready": True})

    routes = OpenAIRoutes(generator, model, api_key).routes()
    return Starlette(routes=[Route("/v2/health/live", live), Route("/v2/health/ready", ready), *routes])


def serve_generator(model: str, cluster_file: Any, *, name: str | None, host: str, port: int, api_key: str | None,
                    secret_key: Any, insecure: bool, detection_s: float, console: Any, context: int = 256,
                    sequences: int = 8) -> None:
    """Deploy the causal LM `model` (hf:PATH) on the cluster file and serve /v1 until SIGINT or SIGTERM."""
    import uvicorn

    from partita.model.hf import load_hf
    from partita.runtime.connect import open_cluster
    from partita.runtime.generate import deploy_generator
    from partita.runtime.supervisor import Supervision

    lm = load_hf(model)
    served = name or lm.name
    with open_cluster(cluster_file, secret_key=secret_key, insecure=insecure) as handle:
        with deploy_generator(lm, handle, context=context, sequences=sequences,
                              supervise=Supervision(detection_s=detection_s, drift=False, joins=False)) as generator:
            shown = f"[{host}]" if ":" in host else host
            console.print(f"API: http://{shown}:{port}/v1/completions (model {served!r})", highlight=False)
            config = uvicorn.Config(create_openai_app(generator, served, api_key=api_key), host=host, port=port,
                                    log_level="warning", access_log=False)
            uvicorn.Server(config).run()
