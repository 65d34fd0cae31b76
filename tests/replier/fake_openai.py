"""TEST DOUBLE: a tiny OpenAI-compatible `/v1/chat/completions` server for the replier's tests.

Behaviour is chosen by the requested model name:
* `fake-echo`: answers "LLM reply to: <last user message>" with token usage;
* `fake-500`: HTTP 500 every time;
* `fake-slow`: sleeps longer than any test timeout before answering;
* `fake-delay`: answers like `fake-echo` after one second (a reply in flight at shutdown);
* `fake-sleep-<seconds>`: answers like `fake-echo` after that many seconds (LLM calls in flight at a crash);
* `fake-nomemory`: answers like `fake-echo`, but memory-extraction requests get HTTP 500;
* `fake-malformed` / `fake-empty` / `fake-notjson` / `fake-400`: a response without choices, an
  empty reply, a 200 that is not JSON, and a non-retryable HTTP 400;
* `fake-redirect`: HTTP 302 to `/v1/redirected` on this server (which records every hit in `redirected`);
* `fake-hang`: never answers (until the client gives up and disconnects, at most 60 s);
* `fake-sleep-<seconds>` (e.g. `fake-sleep-0.05`): answers like `fake-echo` after that many seconds;
* `fake-fail-<anything>`: HTTP 500 every time (one failing model per test, counted on its own).
Memory-extraction requests (system prompt asks to "extract one short fact") get "NONE" unless the
user said "my name is X". Every request body is recorded in `requests`, and its Authorization header
(None when absent) in `authorizations`, for assertions.
"""

from __future__ import annotations

import asyncio
import re
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from testsupport.servers import ThreadedServer


async def _hang(request: Request, limit: float) -> None:
    """Wait until the client disconnects (or `limit` passes), so hung calls end with the test."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and not await request.is_disconnected():
        await asyncio.sleep(0.1)


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.authorizations: list[str | None] = []
        self.redirected: list[str] = []
        routes = [
            Route("/v1/chat/completions", self._completions, methods=["POST"]),
            Route("/v1/redirected", self._redirected, methods=["GET", "POST"]),
        ]
        self._server = ThreadedServer(Starlette(routes=routes), name="fake-openai")
        self.port = self._server.port
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    async def _completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.authorizations.append(request.headers.get("authorization"))
        model = body.get("model", "")
        messages = body.get("messages", [])
        if model == "fake-redirect":
            return Response(status_code=302, headers={"Location": f"{self.base_url}/redirected"})
        if model == "fake-hang":
            await _hang(request, 60.0)
            return JSONResponse({"error": {"message": "gave up hanging"}}, status_code=504)
        if model == "fake-500" or model.startswith("fake-fail-"):
            return JSONResponse({"error": {"message": "fake upstream failure"}}, status_code=500)
        if model == "fake-400":
            return JSONResponse({"error": {"message": "bad request"}}, status_code=400)
        if model == "fake-notjson":
            return PlainTextResponse("this is not json")
        if model == "fake-malformed":
            return JSONResponse({"id": "chatcmpl-fake", "choices": []})
        if model == "fake-empty":
            return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": "  "}}]})
        if model == "fake-slow":
            await asyncio.sleep(5)
        if model == "fake-delay":
            await asyncio.sleep(1)
        if model.startswith("fake-sleep-"):
            await asyncio.sleep(float(model.removeprefix("fake-sleep-")))
        system = messages[0]["content"] if messages and messages[0]["role"] == "system" else ""
        last_user = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        if "extract one short fact" in system:
            if model == "fake-nomemory":
                return JSONResponse({"error": {"message": "extraction unavailable"}}, status_code=500)
            match = re.search(r"my name is (\w+)", last_user, re.IGNORECASE)
            text = f"The user's name is {match.group(1)}" if match else "NONE"
        else:
            text = f"LLM reply to: {last_user}"
        return JSONResponse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
            }
        )

    async def _redirected(self, request: Request) -> Response:
        self.redirected.append(request.headers.get("authorization") or "")
        return JSONResponse({"choices": [{"index": 0, "message": {"role": "assistant", "content": "followed"}}]})

    def calls(self, model: str) -> int:
        """How many requests (chat and memory extraction) asked for `model`."""
        return sum(1 for body in list(self.requests) if body.get("model") == model)

    def start(self) -> FakeOpenAI:
        self._server.start(timeout=10)
        return self

    def stop(self) -> None:
        self._server.stop(timeout=5)
