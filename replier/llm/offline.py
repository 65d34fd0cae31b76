"""The offline responder: deterministic, persona-aware, and always labelled as offline.

Used when no LLM provider is configured. It is not a language model and never claims to be one:
replies start with "[offline]" and the reply metadata says `offline: true`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from replier.llm.base import LlmRequest, LlmResult

_NAME_PATTERNS = (
    re.compile(r"\bmy name is\s+([^\s,.!?;:]{1,40})", re.IGNORECASE),
    re.compile(r"\bcall me\s+([^\s,.!?;:]{1,40})", re.IGNORECASE),
    re.compile(r"我叫\s*([^\s\uff0c\u3002\uff01\uff1f,.!?]{1,20})"),
)
_REMEMBER = re.compile(r"\bremember (?:that )?(.{3,160}?)[.!?]?$", re.IGNORECASE)
_MEMORY_NAME = re.compile(r"(?:name is|is called)\s+([^\s,.!?;:]{1,40})", re.IGNORECASE)


def rule_memory(user_text: str, user_name: str | None = None) -> str | None:
    """One memory line from a user message by simple rules ("my name is …", "remember …"), or None."""
    who = user_name or "the user"
    for pattern in _NAME_PATTERNS:
        match = pattern.search(user_text)
        if match:
            return f"{who}'s name is {match.group(1)}"
    match = _REMEMBER.search(user_text.strip())
    if match:
        return f"{who} asked to remember: {match.group(1).strip()}"
    return None


@dataclass(frozen=True, slots=True)
class OfflineAnswer:
    text: str
    memory: str | None  # a memory line by `rule_memory`, not yet checked against the known ones


def offline_answer(request: LlmRequest, *, keep_memory: bool) -> OfflineAnswer:
    """The offline responder's reply and memory for one message: pure, so it runs anywhere (the
    replier calls it inside the ingest job, in a database thread)."""
    memory = rule_memory(request.user_text, request.user_name) if keep_memory else None
    return OfflineAnswer(respond(request), memory)


def respond(request: LlmRequest) -> str:
    """The "[offline]" reply: the message echoed, with the persona and what is remembered."""
    persona = request.persona
    text = " ".join(request.user_text.split())
    snippet = text if len(text) <= 120 else text[:117] + "..."
    known_name = None
    for memory in request.memories:
        match = _MEMORY_NAME.search(memory)
        if match:
            known_name = match.group(1)
            break
    greeting = f"{known_name}, " if known_name else ""
    parts = [f"[offline] {greeting}{request.agent_name} heard: \u201c{snippet}\u201d."]
    if persona is not None:
        parts.append(f"({persona.personality}; {persona.reply_style})")
        if persona.interests:
            parts.append(f"Ask me about {_pick(persona.interests, text)}.")
    if request.memories:
        parts.append(f"I remember {len(request.memories)} thing(s) about this chat.")
    return " ".join(parts)


def _pick(options: list[str], seed: str) -> str:
    digest = hashlib.sha256(seed.encode()).digest()
    return options[digest[0] % len(options)]


class OfflineProvider:
    name = "offline"
    offline = True

    async def complete(self, request: LlmRequest) -> LlmResult:
        return LlmResult(
            text=self.respond(request),
            provider=self.name,
            model="offline",
            prompt_tokens=0,
            completion_tokens=0,
            offline=True,
        )

    def respond(self, request: LlmRequest) -> str:
        return respond(request)

    async def extract_memory(self, request: LlmRequest, reply: str) -> str | None:
        return rule_memory(request.user_text, request.user_name)

    async def aclose(self) -> None:
        return None
