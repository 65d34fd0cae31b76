"""Issue #10 findings 1 and 3 in the replier: the operator's LLM key only goes to the operator's own
endpoint, and agents' LLM requests only go to allowed destinations (checked at connect time, with the
address that was checked; no query smuggling, no redirects). The LLM is the local test double
(fake_openai.py); a second instance plays the tenant's listener and records Authorization headers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid

import httpcore
import httpx
import pytest
import socketio
from fake_openai import FakeOpenAI
from replier_support import MaimClient, ReplierProcess, api_message, free_port, make_tenant, run

from isolation import Scoped
from isolation.agent_config import LlmSettings
from isolation.egress import EgressRefused, EgressSettings, check_address, check_agent_llm
from replier.answer import FALLBACK_REPLY
from replier.connections import Connection, new_connection_id
from replier.core.config import ReplierSettings
from replier.llm import LlmError, LlmRequest, resolve_provider_config
from replier.llm.guard import GuardedBackend, guarded_transport, system_resolver
from replier.llm.openai import OpenAIProvider
from replier.metrics import Metrics
from replier.outbox import Outbox
from replier.protocol import API, Inbound
from replier.service import Replier
from replier.store import Store

OPERATOR_KEY = "sk-operator-" + uuid.uuid4().hex
PUBLIC = "93.184.215.14"  # any public unicast address


def _policy(**values) -> EgressSettings:
    base = {"llm_base_url": "", "llm_operator_key_urls": "", "llm_allowed_hosts": "", "llm_allow_private": False}
    return EgressSettings(_env_file=None, **{**base, **values})


@pytest.fixture
def listener():
    """The tenant's own 'LLM': records what it is sent (Authorization headers included)."""
    server = FakeOpenAI().start()
    yield server
    server.stop()


# -- finding 1, end to end ----------------------------------------------------------------------------
def test_the_operators_key_never_reaches_an_agents_own_url(provisioned, configured_db, fake_llm, listener):
    """Rows as they could have been saved before the rule: the replier re-checks at use."""
    env = {
        "LLM_PROVIDER": "openai",
        "LLM_BASE_URL": fake_llm.base_url,
        "LLM_MODEL": "fake-echo",
        "LLM_API_KEY": OPERATOR_KEY,
        "LLM_MEMORY_EXTRACTION": "false",
        "LLM_ALLOWED_HOSTS": "127.0.0.1",  # both fakes listen on loopback
    }
    own_openai = make_tenant(llm={"provider": "openai", "base_url": listener.base_url, "model": "fake-echo"})
    own_default = make_tenant(llm={"provider": "default", "base_url": listener.base_url})
    own_key = make_tenant(
        llm={"provider": "openai", "base_url": listener.base_url, "model": "fake-echo"}, llm_key="sk-tenant-own"
    )
    smuggled = make_tenant(llm={"provider": "openai", "base_url": listener.base_url + "/chat/completions?x="})
    operator = make_tenant(llm={"provider": "default"})
    before = len(fake_llm.authorizations)
    server = ReplierProcess(provisioned.url, provisioned.app_role, **env).start()

    async def scenario():
        replies = {}
        for label, ta in (
            ("own_openai", own_openai),
            ("own_default", own_default),
            ("own_key", own_key),
            ("smuggled", smuggled),
            ("operator", operator),
        ):
            client = await MaimClient(server.url, ta.secret).start()
            try:
                await client.send(api_message(f"hello from {label}", user_id="u"))
                replies[label] = (await client.reply(timeout=15)).message_segment.data
            finally:
                await client.stop()
        return replies

    try:
        replies = run(scenario())
        logs = server.logs()
    finally:
        server.stop()
    # the tenant's listener was called for the three agents with a usable URL, never with the operator's key
    assert OPERATOR_KEY not in str(listener.authorizations)
    assert sorted(listener.authorizations, key=str) == ["Bearer sk-tenant-own", None, None]
    assert replies["own_openai"] == "LLM reply to: u: hello from own_openai"
    assert replies["own_key"] == "LLM reply to: u: hello from own_key"
    # the operator's own endpoint still gets the operator's key
    assert fake_llm.authorizations[before:] == [f"Bearer {OPERATOR_KEY}"]
    assert replies["operator"] == "LLM reply to: u: hello from operator"
    # finding 3: a base URL with a query is never called (it would have POSTed to ...?x=/chat/completions)
    assert replies["smuggled"] == FALLBACK_REPLY
    assert not any("hello from smuggled" in str(r) for r in listener.requests)
    usage = Scoped(smuggled.stream_ctx("qq", user_id="u")).llm_usage.list()
    assert [u["outcome"] for u in usage] == ["error"] and "must not contain a query" in usage[0]["error"]
    assert f"agent {smuggled.agent_id}: LLM call failed (destination refused" in logs
    assert OPERATOR_KEY not in logs and "sk-tenant-own" not in logs


# -- finding 3: the connect-time check ------------------------------------------------------------------
def _inbound(message_id: str, text: str) -> Inbound:
    return Inbound(
        API, "env-" + message_id, message_id, "qq", 1.0, text, {"type": "text", "data": text}, "u1", "U", None, None
    )


@contextlib.asynccontextmanager
async def _replier(policy: EgressSettings, resolver):
    """A real in-process `Replier` (real store and database) whose providers use `policy` and `resolver`."""
    settings = ReplierSettings(
        _env_file=None, llm_provider="", llm_max_retries=2, llm_retry_backoff_seconds=0.01, agent_cache_seconds=0,
        gc_freeze=False, llm_memory_extraction=False, usage_flush_seconds=60,
    )  # fmt: skip
    store = Store(workers=1, batch_max=64, checkpoint_seconds=0)
    store.start()
    metrics = Metrics()
    replier = Replier(settings, Outbox(socketio.AsyncServer(async_mode="asgi"), metrics), metrics, store)
    replier.providers.egress = policy
    replier.providers.resolver = resolver
    try:
        yield replier
    finally:
        await asyncio.to_thread(store.stop)
        await replier.providers.aclose()


async def _answer(replier: Replier, ta, message_id: str, text: str) -> None:
    conn = Connection(uuid.uuid4().hex, new_connection_id(), API, ta.key_id, ta.tenant_id, ta.agent_id, "qq", ta.secret)
    replier.connections.add(conn)
    await replier.streams.accept(conn, _inbound(message_id, text))
    await replier.streams.settle(15)


def test_a_name_that_rebinds_to_loopback_after_saving_is_refused_at_connect(configured_db, listener, caplog):
    """DNS rebinding: public when the agent is saved, 127.0.0.1 when the replier connects."""
    base_url = f"http://llm.rebind.test:{listener.port}/v1"
    answers = {"llm.rebind.test": [PUBLIC]}
    asked: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return answers[host]

    strict = _policy()
    # save time: a name is accepted (and what it resolves to now would pass the check anyway)
    assert check_agent_llm(base_url, "openai", True, policy=strict) is None
    for address in asyncio.run(resolver("llm.rebind.test", listener.port)):
        check_address(address, "llm.rebind.test", policy=strict)
    ta = make_tenant(llm={"provider": "openai", "base_url": base_url, "model": "fake-echo"}, llm_key="sk-tenant-rb")
    answers["llm.rebind.test"] = ["127.0.0.1"]  # ... and the answer changes

    async def refused():
        async with _replier(strict, resolver) as replier:
            await _answer(replier, ta, "rb-1", "rebound")

    with caplog.at_level(logging.WARNING, "replier"):
        asyncio.run(refused())
    assert listener.requests == [] and asked[-1] == "llm.rebind.test"
    history = ta.history("qq", user_id="u1")
    assert [m["text"] for m in history] == ["rebound", FALLBACK_REPLY]
    usage = Scoped(ta.stream_ctx("qq", user_id="u1")).llm_usage.list()
    assert (
        "destination refused: llm.base_url host llm.rebind.test is not allowed (loopback address)" in usage[0]["error"]
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and ta.agent_id in warnings[0]  # once, not per retry
    assert asked.count("llm.rebind.test") == 2  # save-time lookup + one connect attempt: not retried
    assert "sk-tenant-rb" not in caplog.text

    # When the operator allows loopback, the same name reaches the listener at the address the resolver
    # gave: the name itself does not resolve anywhere, so nothing resolved it a second time.
    async def allowed():
        async with _replier(_policy(llm_allowed_hosts="127.0.0.1"), resolver) as replier:
            await _answer(replier, ta, "rb-2", "allowed now")

    asyncio.run(allowed())
    assert len(listener.requests) == 1 and listener.authorizations == ["Bearer sk-tenant-rb"]


def _provider(base_url: str, **kwargs) -> OpenAIProvider:
    return OpenAIProvider(base_url, model="fake-echo", max_retries=2, backoff=0.01, timeout=5, **kwargs)


async def _complete(provider: OpenAIProvider) -> None:
    try:
        await provider.complete(LlmRequest(messages=[], user_text="hi"))
    finally:
        await provider.aclose()


def test_redirects_are_not_followed(fake_llm):
    provider = OpenAIProvider(
        fake_llm.base_url,
        model="fake-redirect",
        max_retries=2,
        api_key="sk-r",
        egress=_policy(llm_allowed_hosts="127.0.0.1"),
    )
    assert provider._client.follow_redirects is False
    before = len(fake_llm.requests)
    with pytest.raises(LlmError, match="HTTP 302: redirects are not followed"):
        asyncio.run(_complete(provider))
    assert fake_llm.redirected == [] and len(fake_llm.requests) == before + 1  # not retried either


def test_a_query_in_the_base_url_is_never_sent(fake_llm):
    """`.../chat/completions?x=` would make the request line `/v1/chat/completions?x=/chat/completions`."""
    before = len(fake_llm.requests)
    provider = _provider(fake_llm.base_url + "/chat/completions?x=", egress=_policy(llm_allowed_hosts="127.0.0.1"))
    with pytest.raises(LlmError, match=r"destination refused: llm\.base_url must not contain a query"):
        asyncio.run(_complete(provider))
    assert len(fake_llm.requests) == before


def test_loopback_is_refused_unless_allowed_or_the_operators_own(fake_llm):
    before = len(fake_llm.requests)
    with pytest.raises(LlmError, match=r"host 127\.0\.0\.1 is not allowed \(loopback address\)"):
        asyncio.run(_complete(_provider(fake_llm.base_url, egress=_policy())))
    assert len(fake_llm.requests) == before
    operator = _provider(fake_llm.base_url, egress=_policy(llm_operator_key_urls=fake_llm.base_url + "/"))
    assert operator.trusted  # the operator's own endpoint: no address check (Ollama on localhost is normal)
    asyncio.run(_complete(operator))
    asyncio.run(_complete(_provider(fake_llm.base_url, egress=_policy(llm_allowed_hosts="127.0.0.1"))))
    assert len(fake_llm.requests) == before + 2


# -- the network backend's own paths -------------------------------------------------------------------
def _backend(answer, policy: EgressSettings | None = None) -> GuardedBackend:
    async def resolver(host: str, port: int) -> list[str]:
        if isinstance(answer, BaseException):
            raise answer
        return answer

    return GuardedBackend(policy or _policy(llm_allowed_hosts="127.0.0.1"), resolver=resolver)


def test_every_resolved_address_is_checked_and_a_refusal_is_not_a_connect_error(fake_llm):
    backend = _backend([PUBLIC, "127.0.0.1"], _policy())
    with pytest.raises(EgressRefused, match="loopback"):
        asyncio.run(backend.connect_tcp("mixed.test", fake_llm.port, timeout=1))
    assert not issubclass(EgressRefused, (httpcore.ConnectError, OSError))  # so it is never retried


def test_the_backend_tries_each_checked_address_in_turn(fake_llm):
    async def connect(backend: GuardedBackend):
        stream = await backend.connect_tcp("two.test", fake_llm.port, timeout=2)
        peer = stream.get_extra_info("server_addr")
        await stream.aclose()
        return peer

    # 127.0.0.2 is loopback too but nothing listens there: the next checked address is used
    loopback = _policy(llm_allowed_hosts="127.0.0.0/8")
    assert asyncio.run(connect(_backend(["127.0.0.2", "127.0.0.1"], loopback))) == ("127.0.0.1", fake_llm.port)
    closed = free_port()
    with pytest.raises(httpcore.ConnectError):
        asyncio.run(_backend(["127.0.0.2", "127.0.0.1"], loopback).connect_tcp("none.test", closed, timeout=2))


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (OSError("no such host"), httpcore.ConnectError, "cannot resolve x.test"),
        ([], httpcore.ConnectError, "x.test resolves to no address"),
    ],
)
def test_resolution_failures_are_connect_errors(answer, error, message):
    with pytest.raises(error, match=message):
        asyncio.run(_backend(answer).connect_tcp("x.test", 80, timeout=1))


def test_a_slow_resolver_times_out():
    async def slow(host: str, port: int) -> list[str]:
        await asyncio.sleep(5)
        return [PUBLIC]

    backend = GuardedBackend(_policy(), resolver=slow)
    with pytest.raises(httpcore.ConnectTimeout, match=r"resolving slow\.test timed out"):
        asyncio.run(backend.connect_tcp("slow.test", 80, timeout=0.05))


def test_no_unix_sockets_and_sleep_is_delegated():
    backend = _backend([PUBLIC])
    with pytest.raises(EgressRefused, match="unix sockets"):
        asyncio.run(backend.connect_unix_socket("llm.sock"))
    assert asyncio.run(backend.sleep(0)) is None


def test_the_system_resolver_answers_addresses():
    assert "127.0.0.1" in asyncio.run(system_resolver("127.0.0.1", 80))


def test_tls_is_verified_against_the_name_not_the_checked_address():
    """httpcore hands the origin's host name to `start_tls`; the backend only replaces where to connect."""
    seen: dict = {}

    class Stream(httpcore.AsyncNetworkStream):
        async def start_tls(self, ssl_context, server_hostname=None, timeout=None):
            seen["server_hostname"] = server_hostname
            raise httpcore.ConnectError("stop here")

        async def aclose(self) -> None:
            return None

    class Inner(httpcore.AsyncNetworkBackend):
        async def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
            seen["connected_to"] = host
            return Stream()

    async def resolver(host: str, port: int) -> list[str]:
        return [PUBLIC]

    transport = guarded_transport(_policy(), limits=httpx.Limits(), resolver=resolver)
    transport._pool._network_backend.inner = Inner()

    async def go():
        async with httpx.AsyncClient(transport=transport) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get("https://llm.tls.test/v1")

    asyncio.run(go())
    assert seen == {"connected_to": PUBLIC, "server_hostname": "llm.tls.test"}


def test_provider_resolution_fills_in_the_operators_key_only_for_the_operators_urls():
    policy = _policy(llm_operator_key_urls="https://eu.llm.operator.test/v1")
    defaults = {
        "default_provider": "openai",
        "default_base_url": "https://llm.operator.test/v1/",
        "default_model": "m",
        "default_api_key": OPERATOR_KEY,
        "egress": policy,
    }

    def resolve(key: str | None = None, **llm):
        config = resolve_provider_config(LlmSettings(**llm), key, **defaults)
        return config.api_key, config.trusted

    assert resolve() == (OPERATOR_KEY, True)  # no URL of its own: the operator's endpoint
    assert resolve(provider="openai", base_url="https://LLM.operator.test:443/v1") == (OPERATOR_KEY, True)
    assert resolve(provider="openai", base_url="https://eu.llm.operator.test/v1/") == (OPERATOR_KEY, True)
    assert resolve(provider="openai", base_url="https://tenant.example/v1") == (None, False)
    assert resolve(provider="default", base_url="https://tenant.example/v1") == (None, False)
    assert resolve(provider="default", base_url="https://llm.operator.test/v2") == (None, False)  # another path
    assert resolve("sk-own", provider="openai", base_url="https://tenant.example/v1") == ("sk-own", False)
    assert resolve("sk-own") == ("sk-own", True)
