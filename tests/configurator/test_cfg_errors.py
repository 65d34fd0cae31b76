"""One error body everywhere, size limits, and hostile input stored verbatim (never a 500)."""

from __future__ import annotations

import pytest
from cfg_helpers import create_agent

NASTY = [
    "名字 🤖 ñ",
    "Robert'); DROP TABLE agents;--",
    "' OR '1'='1",
    "<script>alert('x')</script>",
    '"><img src=x onerror=alert(1)>',
    "%_\\%",
    "a\u200bb\u202ec",
    "   spaced   ",
]


def _assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code


def test_unknown_route_and_wrong_method(client):
    _assert_error(client.get("/api/v1/nope"), 404, "not_found")
    _assert_error(client.get("/definitely/not/here"), 404, "not_found")
    _assert_error(client.put("/api/v1/agents"), 405, "method_not_allowed")
    _assert_error(client.delete("/health"), 405, "method_not_allowed")


def test_validation_errors_use_the_error_body(client, owner):
    response = client.post("/api/v1/agents", json={"name": 5}, headers=owner.headers)
    _assert_error(response, 422, "validation_error")
    assert response.json()["error"]["details"][0]["loc"] == ["body", "name"]


def test_malformed_json_is_a_client_error(client, owner):
    headers = {**owner.headers, "content-type": "application/json"}
    response = client.post("/api/v1/agents", content=b"{not json", headers=headers)
    assert response.status_code in (400, 422)
    assert response.json()["error"]["code"] in ("bad_request", "validation_error")
    wrong_type = client.post("/api/v1/agents", content=b'["a list"]', headers=headers)
    _assert_error(wrong_type, 422, "validation_error")


def test_oversized_body_is_413(client, owner, settings):
    big = {"name": "big", "description": "x" * (settings.max_body_bytes + 10)}
    _assert_error(client.post("/api/v1/agents", json=big, headers=owner.headers), 413, "payload_too_large")
    # Unauthenticated too: the limit applies before anything else reads the body.
    _assert_error(client.post("/api/v1/auth/register", json=big), 413, "payload_too_large")


def test_oversized_streamed_body_without_content_length_is_413(client, owner, settings):
    chunk = b"x" * 8192

    def body():
        yield b'{"name": "streamed", "description": "'
        for _ in range(settings.max_body_bytes // len(chunk) + 2):
            yield chunk
        yield b'"}'

    headers = {**owner.headers, "content-type": "application/json"}
    response = client.post("/api/v1/agents", content=body(), headers=headers)
    assert "content-length" not in {k.lower() for k in response.request.headers}
    _assert_error(response, 413, "payload_too_large")


def test_body_just_under_the_limit_is_accepted(client, owner, settings):
    response = client.post("/api/v1/agents", json={"name": "fits", "description": "y" * 1900}, headers=owner.headers)
    assert response.status_code == 201


def test_bad_content_length_is_400(client):
    import httpx

    transport = client._transport  # the TestClient's ASGI transport lets us send a lying header
    request = httpx.Request(
        "POST", "http://testserver/api/v1/auth/login", headers={"content-length": "-5"}, content=b""
    )
    request.headers["content-length"] = "-5"
    response = transport.handle_request(request)
    assert response.status_code == 400


@pytest.mark.parametrize("text", NASTY)
def test_hostile_strings_are_stored_verbatim(client, owner, text):
    agent = create_agent(
        client,
        owner,
        name=text,
        description=text,
        persona={"personality": text, "interests": [text], "reply_style": text},
    )
    fetched = client.get(f"/api/v1/agents/{agent['id']}", headers=owner.headers).json()
    assert fetched["name"] == text and fetched["description"] == text
    assert fetched["persona"]["personality"] == text and fetched["persona"]["interests"] == [text]
    memory = client.post(f"/api/v1/agents/{agent['id']}/memories", json={"content": text}, headers=owner.headers)
    assert memory.status_code == 201 and memory.json()["content"] == text
    tenant = client.patch("/api/v1/tenant", json={"name": text, "settings": {text: text}}, headers=owner.headers)
    assert tenant.status_code == 200 and tenant.json()["name"] == text and tenant.json()["settings"] == {text: text}


@pytest.mark.parametrize(
    "bad",
    ["nul\x00byte", "lone \ud800 surrogate"],
)
def test_unstorable_text_is_422_not_500(client, owner, bad):
    import json

    headers = {**owner.headers, "content-type": "application/json"}
    for path, body in (
        ("/api/v1/agents", {"name": bad}),
        ("/api/v1/agents", {"name": "ok", "persona": {"personality": bad}}),
    ):
        raw = json.dumps(body).encode()  # json escapes make the surrogate transportable
        response = client.post(path, content=raw, headers=headers)
        _assert_error(response, 422, "validation_error")
    login = client.post(
        "/api/v1/auth/login", content=json.dumps({"username": bad, "password": "x"}).encode(), headers=headers
    )
    assert login.status_code in (401, 422)


def test_non_finite_numbers_and_deep_json_are_422(client, owner):
    headers = {**owner.headers, "content-type": "application/json"}
    nan = client.patch("/api/v1/tenant", content=b'{"settings": {"x": NaN}}', headers=headers)
    _assert_error(nan, 422, "validation_error")
    deep = "[" * 40 + "]" * 40
    response = client.patch("/api/v1/tenant", content=f'{{"settings": {{"x": {deep}}}}}'.encode(), headers=headers)
    _assert_error(response, 422, "validation_error")


def test_odd_path_ids_are_404(client, owner):
    for agent_id in ("%00", "a" * 300, "..", "agt_x%27%20OR%201=1", "%F0%9F%A4%96"):
        response = client.get(f"/api/v1/agents/{agent_id}", headers=owner.headers)
        assert response.status_code == 404, agent_id
        assert response.json()["error"]["code"] == "not_found"


def test_storage_refusals_from_isolation_are_422(client, owner):
    """Values the isolation layer refuses (InvalidValueError) map to 422, whichever way they arrive."""
    from configurator.core.errors import install_error_handlers  # noqa: F401 - the handler under test
    from isolation.errors import InvalidValueError

    app = client.app

    @app.get("/_test/invalid-value", include_in_schema=False)
    def _raise():
        raise InvalidValueError("text must not contain NUL (\\x00) characters")

    try:
        response = client.get("/_test/invalid-value")
        _assert_error(response, 422, "validation_error")
    finally:
        app.router.routes[:] = [r for r in app.router.routes if getattr(r, "path", "") != "/_test/invalid-value"]
