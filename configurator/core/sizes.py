"""Size limits of stored JSON: tenant `settings` and agent `persona`/`config`/`llm`.

The request body limit (`MAX_BODY_BYTES`) bounds one request, not what a tenant keeps: settings are
stored, returned with every read, and loaded by the replier, so each is held to `MAX_SETTINGS_BYTES`
of compact JSON (UTF-8, as stored) and a larger one is a 422.
"""

from __future__ import annotations

import json
from typing import Any

from configurator.core.errors import ApiError


def json_size(value: Any) -> int:
    """Bytes of `value` as compact UTF-8 JSON, serialised as the models store it (the standard library,
    which also takes integers beyond 64 bits, unlike orjson)."""
    return len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())


def check_json_sizes(limit: int, **values: Any) -> None:
    """422 naming the first of `values` (body field name → value) larger than `limit` bytes."""
    for field, value in values.items():
        size = json_size(value)
        if size > limit:
            message = f"{field} is {size} bytes of JSON; at most {limit} are allowed"
            raise ApiError(
                422, "validation_error", message, [{"loc": ["body", field], "msg": message, "type": "too_large"}]
            )
