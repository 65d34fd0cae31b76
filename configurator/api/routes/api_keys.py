"""API keys of an agent (owner/admin manage them; members may list them).

The secret (`mtk_…`) is returned once, by the create call; lists and every later response show only
a short prefix. The database keeps a SHA-256 hash.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi import APIRouter, Response

from configurator.api.deps import ADMIN, AgentId, CurrentPrincipal, KeyId, PageDep, SignalsDep
from configurator.core.errors import ApiError, responses
from configurator.schemas import ApiKeyCreate, ApiKeyCreated, ApiKeyOut, Page
from isolation.signals import Signal

router = APIRouter(tags=["api keys"])


@router.post(
    "/agents/{agent_id}/api-keys",
    status_code=201,
    response_model=ApiKeyCreated,
    responses=responses(401, 403, 404, 413, 422),
)
def create_api_key(principal: CurrentPrincipal, agent_id: AgentId, body: ApiKeyCreate) -> dict:
    expires_at = None
    if body.expires_at is not None:
        aware = body.expires_at if body.expires_at.tzinfo else body.expires_at.replace(tzinfo=UTC)
        if aware <= datetime.now(UTC):
            raise ApiError(
                422, "validation_error", "expires_at must be in the future", [{"loc": ["body", "expires_at"]}]
            )
        expires_at = aware.astimezone(UTC).replace(tzinfo=None)
    with principal.session(ADMIN, write=True) as session:
        row, secret = session.scoped.api_keys.create(
            agent_id, name=body.name, permissions=body.permissions, expires_at=expires_at
        )
    return {**row, "secret": secret}


@router.get("/agents/{agent_id}/api-keys", response_model=Page[ApiKeyOut], responses=responses(401, 404, 422))
def list_api_keys(principal: CurrentPrincipal, agent_id: AgentId, page: PageDep) -> dict:
    with principal.session() as session:
        scoped = session.scoped
        scoped.agents.get(agent_id)  # 404 for a missing or foreign agent
        rows = scoped.api_keys.list(agent_id=agent_id, limit=page.limit + 1, offset=page.offset)
    return page.of(rows)


@router.post("/api-keys/{key_id}/revoke", response_model=ApiKeyOut, responses=responses(401, 403, 404))
def revoke_api_key(principal: CurrentPrincipal, key_id: KeyId, signals: SignalsDep) -> dict:
    """Revoke a key (idempotent). Every replier closes its connections at once (with REDIS_URL), or
    within its periodic check."""
    with principal.session(ADMIN, write=True) as session:
        row = session.scoped.api_keys.revoke(key_id)
    signals.publish(Signal("key", principal.tenant_id, key_id=key_id))
    return row


@router.delete("/api-keys/{key_id}", status_code=204, response_class=Response, responses=responses(401, 403, 404))
def delete_api_key(principal: CurrentPrincipal, key_id: KeyId, signals: SignalsDep) -> Response:
    with principal.session(ADMIN, write=True) as session:
        session.scoped.api_keys.delete(key_id)
    signals.publish(Signal("key", principal.tenant_id, key_id=key_id))
    return Response(status_code=204)
