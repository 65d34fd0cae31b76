"""`agents.page_json()` (the page built as JSON by the database) against `list_with_key_flags()`.

The two are written independently (SQL string building vs rows decoded in Python), so agreeing on
awkward content, every page boundary and both databases is evidence that the JSON the configurator
sends on unchanged is exactly the agents the managers see.
"""

from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from isolation import InvalidValueError, IsolationContext, NotFound, Scoped
from isolation.ids import utcnow
from tests.isolation.conftest import make_tenant

AWKWARD_TEXT = [
    "plain",
    "quotes \" and ' and `back`",
    "back\\slash \\n not a newline",
    "line\nbreak\ttab\r\x01\x1f control",
    "<script>alert('x')</script>",
    "'; DROP TABLE agents; --",
    "emoji 🧪 and 中文 and ﷽",
    '{"looks": "like json"}',
]


def _expected(row: dict) -> dict:
    """What a row of `list_with_key_flags()` must look like in the JSON page."""
    out = {k: v for k, v in row.items() if k != "tenant_id"}
    return out


def _decoded(item: dict) -> dict:
    item = dict(item)
    for key in ("created_at", "updated_at"):
        assert item[key].endswith("Z"), item[key]
        item[key] = datetime.fromisoformat(item[key].replace("Z", "+00:00")).astimezone(UTC).replace(tzinfo=None)
    return item


@pytest.fixture
def awkward_tenant(db):
    tenant_id, _, _ = make_tenant(0)
    scoped = Scoped(IsolationContext(tenant_id))
    for i, text in enumerate(AWKWARD_TEXT):
        scoped.agents.create(
            name=f"{i} {text}"[:128],
            description=text * 3,
            persona={"personality": text, "nested": {"list": [1, 2.5, None, True, text]}, "big": 2**62},
            config={"chat": {"reply_mode": "always"}, "note": text},
            llm={"provider": "offline", "model": text},
            encrypted_api_key="encrypted-blob" if i % 3 == 0 else None,
            template_id="creative_companion" if i % 2 else None,
        )
    return scoped


def test_page_json_agrees_with_the_rows_on_every_page(awkward_tenant):
    rows = awkward_tenant.agents.list_with_key_flags(limit=100)
    assert len(rows) == len(AWKWARD_TEXT)
    assert [r["has_api_key"] for r in rows] == [i % 3 == 0 for i in range(len(AWKWARD_TEXT))]
    for limit in (1, 3, len(AWKWARD_TEXT), 50):
        for offset in range(0, len(AWKWARD_TEXT) + 2):
            text, more = awkward_tenant.agents.page_json(limit=limit, offset=offset)
            items = [_decoded(item) for item in orjson.loads(text)]
            assert items == [_expected(r) for r in rows[offset : offset + limit]], (limit, offset)
            assert more is (offset + limit < len(rows)), (limit, offset)


def test_page_json_is_exact_for_timestamps_without_microseconds(awkward_tenant, monkeypatch):
    """SQLite stores a whole second as text without a fraction; the page must still be ISO "...Z"."""
    whole_second = datetime(2030, 1, 2, 3, 4, 5)
    monkeypatch.setattr("isolation.managers.agents.utcnow", lambda: whole_second)
    agent = awkward_tenant.agents.list(limit=1)[0]
    awkward_tenant.agents.update(agent["id"], description="touched")
    text, _ = awkward_tenant.agents.page_json(limit=1)
    item = _decoded(orjson.loads(text)[0])
    assert item["updated_at"] == whole_second == awkward_tenant.agents.get(agent["id"])["updated_at"]
    assert item["description"] == "touched" and item["version"] == 2


def test_page_json_of_an_agent_context_holds_that_agent_only(awkward_tenant):
    wanted = awkward_tenant.agents.list(limit=100)[4]["id"]
    scoped = Scoped(awkward_tenant.ctx.child(agent_id=wanted))
    text, more = scoped.agents.page_json()
    assert [item["id"] for item in orjson.loads(text)] == [wanted] and more is False
    assert [row["id"] for row in scoped.agents.list_with_key_flags()] == [wanted]


def test_empty_tenant_and_bad_pages(db):
    tenant_id, _, _ = make_tenant(0)
    agents = Scoped(IsolationContext(tenant_id)).agents
    assert agents.page_json() == ("[]", False)
    assert agents.page_json(limit=10_000)[0] == "[]"  # capped at MAX_PAGE, not refused
    with pytest.raises(ValueError):
        agents.page_json(limit=0)
    with pytest.raises(ValueError):
        agents.page_json(offset=-1)
    with pytest.raises(ValueError):
        agents.list_with_key_flags(offset=-1)


def test_precompiled_membership_get(db):
    tenant_id, _, account_id = make_tenant(0)
    memberships = Scoped(IsolationContext(tenant_id)).memberships
    row = memberships.get(account_id)
    assert row["tenant_id"] == tenant_id and row["account_id"] == account_id and row["role"] == "owner"
    assert isinstance(row["created_at"], datetime) and abs((utcnow() - row["created_at"]).total_seconds()) < 60
    assert row == memberships.list()[0]  # the peewee-built list decodes the same way
    with pytest.raises(NotFound):
        memberships.get("acc_nobody")


def _signed_in(scoped: Scoped, account_id: str, session_id: str) -> None:
    from datetime import timedelta

    scoped.refresh_tokens.issue(f"jti-{session_id}", account_id, utcnow() + timedelta(days=1), session_id=session_id)


def test_membership_with_agent_page_is_both_statements_in_one(awkward_tenant):
    """`get_with_session_and_agent_page` (the configurator's `GET /agents`) answers what
    `get_with_session` and `agents.page_json` answer separately, on every page."""
    scoped = awkward_tenant
    account_id = scoped.memberships.list()[0]["account_id"]
    _signed_in(scoped, account_id, "sess-1")
    memberships = scoped.memberships
    for limit in (1, 3, len(AWKWARD_TEXT), 50):
        for offset in range(0, len(AWKWARD_TEXT) + 2):
            membership, items, more = memberships.get_with_session_and_agent_page(account_id, "sess-1", limit, offset)
            assert membership == memberships.get_with_session(account_id, "sess-1")
            assert (items, more) == scoped.agents.page_json(limit=limit, offset=offset), (limit, offset)
    # A session that does not exist: the membership says so (the caller refuses), the row is still found.
    gone = memberships.get_with_session_and_agent_page(account_id, "no-such-session", 5, 0)[0]
    assert gone["session_active"] is False
    with pytest.raises(ValueError):
        memberships.get_with_session_and_agent_page(account_id, "sess-1", 5, -1)
    with pytest.raises(ValueError):
        Scoped(scoped.ctx.child(agent_id=scoped.agents.list()[0]["id"])).memberships.get_with_session_and_agent_page(
            account_id, "sess-1"
        )


def test_membership_with_agent_page_never_reads_another_tenants_page(awkward_tenant):
    """An account that is a member elsewhere gets NotFound here, not its own tenant's page nor this one."""
    other_tenant, _, other_account = make_tenant(2)
    other = Scoped(IsolationContext(other_tenant))
    _signed_in(other, other_account, "sess-b")
    with pytest.raises(NotFound):
        awkward_tenant.memberships.get_with_session_and_agent_page(other_account, "sess-b")
    membership, items, _ = other.memberships.get_with_session_and_agent_page(other_account, "sess-b")
    assert membership["tenant_id"] == other_tenant
    assert {item["id"] for item in orjson.loads(items)} == {a["id"] for a in other.agents.list()}
    assert len(orjson.loads(items)) == 2


@pytest.mark.parametrize("number", [float("nan"), float("inf"), float("-inf")])
def test_json_columns_refuse_non_finite_numbers(db, number):
    """JSON columns hold strict JSON (page_json splices them in unparsed), on both databases alike."""
    tenant_id, _, _ = make_tenant(0)
    agents = Scoped(IsolationContext(tenant_id)).agents
    with pytest.raises(InvalidValueError):
        agents.create(name="nan", persona={"x": number}, config={}, llm={})
    assert agents.page_json() == ("[]", False)
