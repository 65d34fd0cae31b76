"""The system catalogue of agent templates (the same for every tenant)."""

from __future__ import annotations

from fastapi import APIRouter

from configurator.api.deps import CurrentPrincipal, PageDep, TemplateId
from configurator.core.errors import responses
from configurator.schemas import Page, TemplateOut
from isolation import system

router = APIRouter(prefix="/agent-templates", tags=["templates"])


@router.get("", response_model=Page[TemplateOut], responses=responses(401, 422))
def list_templates(principal: CurrentPrincipal, page: PageDep) -> dict:
    with principal.session():
        rows = system.list_templates()
    return page.of(rows[page.offset : page.offset + page.limit + 1])


@router.get("/{template_id}", response_model=TemplateOut, responses=responses(401, 404))
def get_template(principal: CurrentPrincipal, template_id: TemplateId) -> dict:
    with principal.session():
        return system.get_template(template_id)
