"""`FastJSONResponse`: a response body serialized once by orjson, for hot read routes.

A route that returns a plain dict is validated against its `response_model` and serialized by
pydantic; for a page of 20 agents that costs more than the database work. Hot routes that build their
body from rows the scoped managers already typed return this instead (FastAPI passes a `Response`
through untouched); their `response_model` still documents the body in OpenAPI, and
`tests/configurator/test_cfg_fast_responses.py` checks the two serializations stay byte-for-byte
equivalent (schemathesis checks every response against the schema too).
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import JSONResponse

# Database timestamps are naive UTC; the response models write them as "...Z" (see schemas.UtcDateTime).
_OPTIONS = orjson.OPT_NAIVE_UTC | orjson.OPT_UTC_Z


def dump_json(content: Any) -> bytes:
    return orjson.dumps(content, option=_OPTIONS)


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dump_json(content)
