"""`FastJSONResponse`: a body serialized by orjson and sent as it is, for hot read routes.

A route that returns a plain dict is validated against its `response_model` and serialized again by
pydantic; for a page of 20 agents that cost more than the database work. `GET /agents` returns this
instead, with the items already written as JSON by the database (`orjson.Fragment`); FastAPI passes a
`Response` through untouched, and the route's `response_model` still documents the body in OpenAPI.
`tests/configurator/test_cfg_fast_responses.py` checks that each item validates as, and equals, what
the pydantic route `GET /agents/{id}` returns; schemathesis checks every response against the schema.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse


class FastJSONResponse(JSONResponse):
    # Naive datetimes are UTC, written "...Z" like the response models' `UtcDateTime`.
    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z)
