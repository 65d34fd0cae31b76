"""OpenAI-compatible `/chat/completions` (OpenAI, DeepSeek, SiliconFlow, vLLM, Ollama) over httpx.

Timeout per attempt, bounded retries with exponential backoff on timeouts, connection errors, 429 and
5xx, and a `FairScheduler` bounding concurrent calls per provider (one provider per endpoint and key,
shared by every agent using them) with a cap and a fair queue per tenant. The HTTP pool has as many
connections as there are slots and a call holds its slot for its whole HTTP exchange, so the pool is
never what a tenant waits for: one tenant's hung requests hold at most its cap of connections.

A request's `deadline` bounds the whole call: the wait for a slot, every attempt (each attempt's
timeout is cut to what is left) and the backoff sleeps. A timed-out attempt is retried only when a
full attempt still fits before the deadline, so retries never multiply a hang.

Egress: a base URL that fails `isolation.egress.check_base_url` is never called, redirects are never
followed, and unless the provider is `trusted` (the operator's own endpoint) every connection goes
through the connect-time address check of `replier.llm.guard`. A refused destination is an `LlmError`
at once (no retry) and is not logged here: the caller logs the failed call once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx

from isolation.egress import EgressRefused, EgressSettings, check_base_url, get_egress_settings, operator_key_allowed
from replier.llm.base import ChatMessage, LlmError, LlmRequest, LlmResult
from replier.llm.fairness import FairScheduler, SlotTimeout, tenant_cap
from replier.llm.guard import Resolver, guarded_transport

log = logging.getLogger("replier.llm.openai")

_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
_MEMORY_PROMPT = (
    "From the user's last message, extract one short fact worth remembering about the user "
    "(name, preference, plan). Answer with that single line, or with NONE if there is nothing."
)


class OpenAIProvider:
    name = "openai"
    offline = False

    def __init__(
        self,
        base_url: str,
        *,
        model: str,
        api_key: str | None = None,
        timeout: float = 30.0,
        max_retries: int = 2,
        backoff: float = 0.25,
        concurrency: int = 16,
        tenant_concurrency: int = 0,
        client: httpx.AsyncClient | None = None,
        trusted: bool | None = None,
        egress: EgressSettings | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        """`concurrency` calls at once, at most `tenant_concurrency` of them per tenant (0: half);
        `trusted`: the operator's own endpoint, exempt from the address check (default: whether
        `base_url` is one of the operator's URLs in `egress`); `resolver` replaces the system resolver
        of the connect-time check (tests)."""
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.scheduler = FairScheduler(concurrency, tenant_cap(concurrency, tenant_concurrency))
        policy = egress or get_egress_settings()
        try:
            check_base_url(self.base_url)
            self.refused: str | None = None
        except EgressRefused as exc:
            self.refused = str(exc)
        self.trusted = operator_key_allowed(self.base_url, policy=policy) if trusted is None else trusted
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._client = client or httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=limits,
            follow_redirects=False,
            transport=None if self.trusted else guarded_transport(policy, limits=limits, resolver=resolver),
        )

    async def complete(self, request: LlmRequest) -> LlmResult:
        body = {
            "model": request.model or self.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "temperature": request.temperature,
            "max_tokens": request.max_tokens,
            "stream": False,
        }
        data = await self._post(body, request)
        try:
            text = data["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as exc:
            raise LlmError(f"malformed completion response: {exc!r}") from None
        if not isinstance(text, str) or not text.strip():
            raise LlmError("the model returned an empty reply")
        usage = data.get("usage") or {}
        return LlmResult(
            text=text.strip(),
            provider=self.name,
            model=str(data.get("model") or body["model"]),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
        )

    async def extract_memory(self, request: LlmRequest, reply: str) -> str | None:
        messages = [ChatMessage("system", _MEMORY_PROMPT), ChatMessage("user", request.user_text)]
        extraction = LlmRequest(
            messages=messages, model=request.model, temperature=0.0, max_tokens=64, timeout=request.timeout,
            tenant=request.tenant, deadline=request.deadline, gate=request.gate,
        )  # fmt: skip
        result = await self.complete(extraction)
        line = result.text.strip().splitlines()[0].strip() if result.text.strip() else ""
        if not line or line.upper().rstrip(".") == "NONE":
            return None
        return line[:300]

    async def _post(self, body: dict, request: LlmRequest) -> dict:
        if self.refused is not None:
            raise LlmError(f"destination refused: {self.refused}")
        url = f"{self.base_url}/chat/completions"
        timeout = request.timeout or self.timeout
        deadline = request.deadline
        last_error = "no attempt made"
        for attempt in range(self.max_retries + 1):
            if attempt:
                pause = self.backoff * (2 ** (attempt - 1))
                if deadline is not None and time.monotonic() + pause >= deadline:
                    break
                await asyncio.sleep(pause)
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                async with self.scheduler.slot(request.tenant, left):
                    if request.gate is not None:
                        request.gate()
                    this_timeout = timeout if deadline is None else min(timeout, deadline - time.monotonic())
                    response = await self._client.post(url, json=body, timeout=max(this_timeout, 0.001))
            except SlotTimeout:
                raise
            except EgressRefused as exc:
                raise LlmError(f"destination refused: {exc}") from None
            except httpx.TimeoutException:
                last_error = f"timeout after {timeout:g}s"
                if deadline is not None and deadline - time.monotonic() < timeout:
                    break  # a full attempt no longer fits: retrying would only extend the hang
                continue
            except httpx.HTTPError as exc:
                last_error = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code == 200:
                try:
                    return response.json()
                except ValueError:
                    raise LlmError("completion response is not JSON") from None
            if response.is_redirect:  # never followed: it could point anywhere, with our key attached
                last_error = f"HTTP {response.status_code}: redirects are not followed"
                break
            last_error = f"HTTP {response.status_code}: {response.text[:200]}"
            if response.status_code not in _RETRY_STATUS:
                break
        if deadline is not None and time.monotonic() >= deadline and last_error == "no attempt made":
            last_error = "deadline passed before the model could be called"
        log.warning("LLM call to %s failed: %s", self.base_url, last_error)
        raise LlmError(last_error)

    async def aclose(self) -> None:
        await self._client.aclose()
