"""Agents: persona, config and LLM settings validated by `isolation.agent_config`.

Creating from a template starts from the template's persona and config; fields given in the request
override them. Every update bumps the agent's `version` (the replier reloads on a new version). The
LLM provider key (`llm.api_key`) is write-only: stored encrypted, reported only as `has_api_key`.

`llm.base_url` is checked against the egress policy (`isolation.egress`): http(s) with no user info,
query or fragment, not a literal non-public IP, and an agent with its own URL brings its own key (the
operator's key only goes to the operator's endpoints). PATCH checks the merged result.
"""

from __future__ import annotations

from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends
from pydantic import ValidationError

from configurator.api.deps import ADMIN, AgentId, CurrentPrincipal, PageDep, SettingsDep, SignalsDep
from configurator.core.errors import ApiError, responses
from configurator.core.responses import FastJSONResponse
from configurator.core.sizes import check_json_sizes
from configurator.schemas import AgentCreate, AgentOut, AgentUpdate, DeletedCounts, LlmInput, Page
from isolation import NotFound, system
from isolation.agent_config import AgentConfig, LlmSettings, Persona
from isolation.crypto import encrypt_secret
from isolation.egress import EgressSettings, check_agent_llm, get_egress_settings
from isolation.signals import Signal

router = APIRouter(prefix="/agents", tags=["agents"])

EgressDep = Annotated[EgressSettings, Depends(get_egress_settings)]


def deep_merge(base: dict, overlay: dict) -> dict:
    merged = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _validated(model, base: dict, overlay: dict, field: str) -> dict:
    try:
        return model(**deep_merge(base or {}, overlay)).model_dump(mode="json")
    except ValidationError as exc:
        details = [{"loc": [field, *err["loc"]], "msg": err["msg"], "type": err["type"]} for err in exc.errors()]
        raise ApiError(422, "validation_error", f"invalid {field}", details) from None


def _given(model) -> dict:
    return model.model_dump(mode="json", exclude_unset=True) if model is not None else {}


def _llm_overlay(llm: LlmInput | None) -> dict:
    return {k: v for k, v in _given(llm).items() if k != "api_key"}


def _check_egress(llm: dict, has_api_key: bool, egress: EgressSettings) -> None:
    """422 when the (merged) LLM settings could send a request or the operator's key where they must not."""
    problem = check_agent_llm(llm.get("base_url"), llm.get("provider", "default"), has_api_key, policy=egress)
    if problem is not None:
        field, message = problem
        details = [{"loc": ["body", "llm", field], "msg": message, "type": "value_error"}]
        raise ApiError(422, "validation_error", message, details)


def agent_out(row: dict, has_api_key: bool) -> dict:
    return {**row, "has_api_key": has_api_key}


@router.post("", status_code=201, response_model=AgentOut, responses=responses(401, 403, 409, 413, 422))
def create_agent(principal: CurrentPrincipal, body: AgentCreate, egress: EgressDep, settings: SettingsDep) -> dict:
    template: dict[str, Any] | None = None
    with principal.session(ADMIN, write=True) as session:
        if body.template_id is not None:
            try:
                template = system.get_template(body.template_id)
            except NotFound:
                raise ApiError(
                    422, "validation_error", "unknown agent template", [{"loc": ["body", "template_id"]}]
                ) from None
        persona = _validated(Persona, template["persona"] if template else {}, _given(body.persona), "persona")
        config = _validated(AgentConfig, template["config"] if template else {}, _given(body.config), "config")
        llm = _validated(LlmSettings, {}, _llm_overlay(body.llm), "llm")
        api_key = body.llm.api_key if body.llm is not None else None
        _check_egress(llm, api_key is not None, egress)
        check_json_sizes(settings.max_settings_bytes, persona=persona, config=config, llm=llm)
        row = session.scoped.agents.create(
            name=body.name,
            description=body.description,
            template_id=body.template_id,
            persona=persona,
            config=config,
            llm=llm,
            encrypted_api_key=encrypt_secret(api_key) if api_key else None,
            status=body.status,
        )
    return agent_out(row, api_key is not None)


@router.get("", response_model=Page[AgentOut], responses=responses(401, 422))
def list_agents(principal: CurrentPrincipal, page: PageDep) -> FastJSONResponse:
    """A page of the tenant's agents, oldest first."""
    # A hot route: the database builds the items as JSON (`agents.page_json`), sent on as it is.
    # `response_model` documents the body; tests/configurator/test_cfg_fast_responses.py checks it
    # against `GET /agents/{id}`.
    # The membership check and the page are one statement (`Principal.agents_page`).
    items, more = principal.agents_page(page.limit, page.offset)
    return FastJSONResponse(page.body(orjson.Fragment(items), more=more))


@router.get("/{agent_id}", response_model=AgentOut, responses=responses(401, 404))
def get_agent(principal: CurrentPrincipal, agent_id: AgentId) -> dict:
    with principal.session() as session:
        agents = session.scoped.agents
        row = agents.get(agent_id)
        has_api_key = agents.encrypted_api_key(agent_id) is not None
    return agent_out(row, has_api_key)


@router.patch("/{agent_id}", response_model=AgentOut, responses=responses(401, 403, 404, 409, 413, 422))
def update_agent(
    principal: CurrentPrincipal,
    agent_id: AgentId,
    body: AgentUpdate,
    egress: EgressDep,
    settings: SettingsDep,
    signals: SignalsDep,
) -> dict:
    with principal.session(ADMIN, write=True) as session:
        agents = session.scoped.agents
        current = agents.get(agent_id)
        fields: dict[str, Any] = {}
        for name in ("name", "description", "status"):
            value = getattr(body, name)
            if value is not None:
                fields[name] = value
        if body.persona is not None:
            fields["persona"] = _validated(Persona, current["persona"], _given(body.persona), "persona")
        if body.config is not None:
            fields["config"] = _validated(AgentConfig, current["config"], _given(body.config), "config")
        if body.llm is not None:
            fields["llm"] = _validated(LlmSettings, current["llm"], _llm_overlay(body.llm), "llm")
            if "api_key" in body.llm.model_fields_set:
                fields["encrypted_api_key"] = encrypt_secret(body.llm.api_key) if body.llm.api_key else None
                has_api_key = body.llm.api_key is not None
            else:
                has_api_key = agents.encrypted_api_key(agent_id) is not None
            _check_egress(fields["llm"], has_api_key, egress)
        sections = {k: fields[k] for k in ("persona", "config", "llm") if k in fields}
        check_json_sizes(settings.max_settings_bytes, **sections)
        row = agents.update(agent_id, **fields) if fields else current
        has_api_key = agents.encrypted_api_key(agent_id) is not None
    if fields:
        signals.publish(Signal("agent", principal.tenant_id, agent_id=agent_id))
    return agent_out(row, has_api_key)


@router.delete("/{agent_id}", response_model=DeletedCounts, responses=responses(401, 403, 404))
def delete_agent(principal: CurrentPrincipal, agent_id: AgentId, signals: SignalsDep) -> DeletedCounts:
    """Delete the agent with its API keys, chat streams, messages, memories and LLM usage."""
    with principal.session(ADMIN, write=True) as session:
        deleted = DeletedCounts(deleted=session.scoped.agents.delete(agent_id))
    signals.publish(Signal("agent", principal.tenant_id, agent_id=agent_id))
    return deleted
