"""One reply, however it was made: by the offline responder inside the ingest job, or by a model after it.

`build_reply` is the only place that turns an answer into what is stored (the reply row, its usage
row, an optional memory) and what is sent with it (the reply metadata), so both paths store and say
the same things.
"""

from __future__ import annotations

from dataclasses import dataclass

from replier.protocol import REPLY_ID_PREFIX, Inbound


@dataclass(frozen=True, slots=True)
class Reply:
    reply_id: str
    reply_to: str  # the inbound message id
    text: str
    agent_name: str
    user_name: str | None  # the sender's name as the history remembers it
    memory: str | None  # a new chat memory to store, already checked by `worth_storing`
    memory_source: str  # "offline-rule" | "llm"
    max_memories: int  # how many memories the stream's cache keeps
    usage: dict  # the llm_usage row's fields
    metadata: dict  # sent in the reply's message_info.additional_config


def build_reply(
    inbound: Inbound,
    *,
    stream_id: str,
    agent_name: str,
    user_name: str | None,
    max_memories: int,
    text: str,
    provider: str,
    model: str | None,
    outcome: str,
    latency_ms: int,
    memory: str | None = None,
    prompt_tokens: int = 0,
    completion_tokens: int = 0,
    error: str | None = None,
    stored_id: str | None = None,
) -> Reply:
    """The reply to `inbound`. `outcome` is "ok", "offline" or "error" (then `error` says why and the
    client is told `llm_unavailable`, never the provider's message). `stored_id` is the id the inbound
    message is stored under (a reused id with new content has a derived one): the reply's id is
    `mt-reply:<stored id>`, while the metadata's `reply_to` names the client's own message id."""
    stored_id = stored_id or inbound.message_id
    offline = outcome == "offline"
    metadata = {
        "provider": provider,
        "model": model,
        "offline": offline,
        "outcome": outcome,
        "chat_stream_id": stream_id,
        "reply_to": inbound.message_id,
    }
    if error is not None:
        metadata["error"] = "llm_unavailable"
    usage = {
        "provider": provider,
        "model": (model or "unknown")[:128],
        "outcome": outcome,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "latency_ms": latency_ms,
        "error": error,
    }
    return Reply(
        reply_id=REPLY_ID_PREFIX + stored_id,
        reply_to=stored_id,
        text=text,
        agent_name=agent_name,
        user_name=user_name,
        memory=memory,
        memory_source="offline-rule" if offline else "llm",
        max_memories=max_memories,
        usage=usage,
        metadata=metadata,
    )
