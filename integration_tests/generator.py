"""What the simulated users say.

With an LLM configured (the replier's settings: `LLM_PROVIDER=openai`, `LLM_BASE_URL`, `LLM_MODEL`,
`LLM_API_KEY`, from the environment or `.env`), each user message is written by that model through the
replier's own provider abstraction (`replier.llm`), playing a user who talks to the agent about a topic
that suits the agent's template. Without one, messages come from per-template topic lists. If a
model call fails, that message falls back to the topic list and the failure is counted.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

TOPICS: dict[str, list[str]] = {
    "friendly_assistant": [
        "weekend plans",
        "a good book to read",
        "learning to cook",
        "houseplants",
        "a trip to Kyoto",
    ],
    "professional_expert": [
        "database indexing",
        "quarterly budgeting",
        "contract negotiation",
        "API rate limiting",
        "migrating to PostgreSQL",
    ],
    "creative_companion": ["a short story idea", "watercolour painting", "writing song lyrics", "a fantasy map"],
    "caring_friend": ["a stressful week at work", "sleeping badly", "missing an old friend", "moving to a new city"],
    "efficient_helper": ["a packing list", "a weekly schedule", "sorting my inbox", "a grocery list for four"],
}
DEFAULT_TOPICS = ["the weather", "music", "sports", "technology", "travel"]

OPENERS = [
    "Hi! My name is {name}. I'd like to talk about {topic}.",
    "Hello, call me {name}. Can you help me with {topic}?",
    "Hey there, my name is {name} and I've been thinking about {topic}.",
]
FOLLOW_UPS = [
    "What would you suggest first when it comes to {topic}?",
    "Interesting. What is the most common mistake people make with {topic}?",
    "Could you give me one concrete example about {topic}?",
    "How much time should I plan for {topic}?",
    "What do you personally like about {topic}?",
    "Please remember that I prefer short answers.",
    "Is there anything I should avoid with {topic}?",
    "Thanks! Can you sum that up in one sentence?",
]

USER_PROMPT = (
    "You play a human user chatting with a chat agent ({template}). Your name is {name} and you want to talk "
    "about {topic}. Write only your next message: one or two short, natural sentences, no quotes, no name prefix."
)


@dataclass
class LlmSettings:
    provider: str = ""
    base_url: str = ""
    model: str = ""
    api_key: str = ""
    timeout: float = 30.0

    @property
    def usable(self) -> bool:
        return self.provider.lower() == "openai" and bool(self.base_url) and bool(self.model)

    @classmethod
    def from_environment(cls) -> LlmSettings:
        """The replier's LLM_* settings (environment or `.env`)."""
        from replier.core.config import ReplierSettings

        s = ReplierSettings()
        return cls(s.llm_provider, s.llm_base_url, s.llm_model, s.llm_api_key, s.llm_timeout_seconds)


@dataclass
class Generator:
    """Produces the next user message of a conversation (async, so an LLM can write it)."""

    llm: LlmSettings | None = None
    seed: int | None = None
    llm_failures: int = 0
    llm_messages: int = 0
    last_llm_error: str | None = None
    _provider: object | None = field(default=None, repr=False)
    _random: random.Random = field(default_factory=random.Random, repr=False)

    def __post_init__(self) -> None:
        if self.seed is not None:
            self._random.seed(self.seed)
        if self.llm is not None and self.llm.usable:
            from replier.llm.registry import make_provider

            self._provider = make_provider(
                "openai",
                base_url=self.llm.base_url.rstrip("/"),
                model=self.llm.model,
                api_key=self.llm.api_key or None,
                timeout=self.llm.timeout,
                max_retries=1,
                trusted=True,  # the operator's own LLM_BASE_URL: exempt from the agents' address check
            )

    @property
    def description(self) -> str:
        if self._provider is not None and self.llm is not None:
            return f"llm (openai-compatible {self.llm.model} at {self.llm.base_url})"
        return "topic templates (no LLM configured)"

    def topic(self, template_id: str | None) -> str:
        return self._random.choice(TOPICS.get(template_id or "", DEFAULT_TOPICS))

    def template_message(self, index: int, name: str, topic: str) -> str:
        pool = OPENERS if index == 0 else FOLLOW_UPS
        return self._random.choice(pool).format(name=name, topic=topic)

    async def next_message(
        self, index: int, *, name: str, topic: str, template_id: str | None, history: list[tuple[str, str]]
    ) -> str:
        """Message number `index` (0-based) of a conversation; `history` is [(role, text)] so far."""
        if self._provider is None:
            return self.template_message(index, name, topic)
        from replier.llm.base import ChatMessage, LlmRequest

        # The simulated user is the "assistant" of this prompt; the agent's replies are its "user" turns.
        messages = [
            ChatMessage("system", USER_PROMPT.format(template=template_id or "general", name=name, topic=topic))
        ]
        for role, text in history:
            messages.append(ChatMessage("assistant" if role == "user" else "user", text))
        if not history:
            messages.append(ChatMessage("user", "(the chat starts; greet the agent and introduce your topic)"))
        try:
            result = await self._provider.complete(LlmRequest(messages=messages, temperature=0.9, max_tokens=120))
            # (a blank answer never gets here: the provider raises LlmError for it)
            text = " ".join(result.text.split())[:1000]
        except Exception as exc:  # any provider failure: count it, fall back to the topic list
            self.llm_failures += 1
            self.last_llm_error = f"{type(exc).__name__}: {exc}"[:300]
            return self.template_message(index, name, topic)
        self.llm_messages += 1
        return text

    async def aclose(self) -> None:
        if self._provider is not None:
            await self._provider.aclose()
