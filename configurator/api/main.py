"""The `/api/v1` router: every resource router of the configurator."""

from __future__ import annotations

from fastapi import APIRouter

from configurator.api.routes import agents, api_keys, auth, history, operator, templates, tenant

api_router = APIRouter()
api_router.include_router(auth.router)
api_router.include_router(tenant.router)
api_router.include_router(templates.router)
api_router.include_router(agents.router)
api_router.include_router(api_keys.router)
api_router.include_router(history.router)
api_router.include_router(operator.router)
