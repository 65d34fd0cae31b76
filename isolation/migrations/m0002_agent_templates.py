"""Seed the system catalogue of agent templates (a data migration)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

VERSION = 2
NAME = "seed agent templates"


def _persona(personality: str, reply_style: str, interests: list[str], plan: str) -> dict:
    return {
        "personality": personality,
        "reply_style": reply_style,
        "interests": interests,
        "plan_style": plan,
        "private_plan_style": plan,
        "states": ["calm", "cheerful", "focused"],
        "state_probability": 0.1,
    }


def _config(max_context: int, reply_mode: str, mood: bool) -> dict:
    return {
        "chat": {"max_context_size": max_context, "reply_mode": reply_mode, "talk_frequency": 1.0},
        "memory": {"enabled": True, "max_memories": 20},
        "mood": {"enabled": mood, "decay_rate": 0.95},
    }


TEMPLATES = [
    (
        "friendly_assistant",
        "Friendly assistant",
        "Warm, helpful and upbeat; a good default for community chats.",
        _persona(
            "warm, patient and encouraging", "short, friendly sentences", ["helping", "daily life"], "answer helpfully"
        ),
        _config(20, "always", True),
    ),
    (
        "professional_expert",
        "Professional expert",
        "Precise and factual; for support and technical questions.",
        _persona(
            "precise, calm and factual", "structured and concise", ["technology", "science"], "give accurate answers"
        ),
        _config(30, "always", False),
    ),
    (
        "creative_companion",
        "Creative companion",
        "Playful and imaginative; for stories, games and brainstorming.",
        _persona(
            "imaginative and playful", "vivid and expressive", ["stories", "art", "games"], "inspire and play along"
        ),
        _config(25, "always", True),
    ),
    (
        "caring_friend",
        "Caring friend",
        "Empathetic listener that remembers what matters to people.",
        _persona("empathetic and attentive", "gentle and supportive", ["feelings", "wellbeing"], "listen and support"),
        _config(40, "always", True),
    ),
    (
        "efficient_helper",
        "Efficient helper",
        "Brief and to the point; for busy groups and task lists.",
        _persona("direct and efficient", "as short as possible", ["productivity", "planning"], "solve the task fast"),
        _config(10, "mention", False),
    ),
]


def apply(conn, dialect: str, app_role: str | None) -> None:
    now = datetime.now(UTC).replace(tzinfo=None)
    for template_id, name, description, persona, config in TEMPLATES:
        conn.execute_sql(
            "INSERT INTO agent_templates (id, name, description, persona, config, created_at) "
            "VALUES (%s, %s, %s, %s, %s, %s)".replace("%s", conn.param),
            (template_id, name, description, json.dumps(persona), json.dumps(config), now),
        )
