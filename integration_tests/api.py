"""A small async client for the configurator's REST API (`/api/v1`), as an ordinary user sees it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

API_PREFIX = "/api/v1"


class ApiError(RuntimeError):
    """A response with an unexpected status code; keeps the status and the error body."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.body = body
        detail = body.get("error", body) if isinstance(body, dict) else body
        super().__init__(f"{method} {path} -> {status}: {str(detail)[:300]}")


@dataclass
class Account:
    """An account registered by a run, with its personal tenant and current tokens."""

    username: str
    email: str
    password: str
    account_id: str
    tenant_id: str
    access_token: str
    refresh_token: str
    agents: list[dict] = field(default_factory=list)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def _body(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text[:500]


class ConfiguratorClient:
    """Thin wrapper over httpx: every call states the status it expects and raises `ApiError` otherwise.

    Requests made with an account's token log the account in again once when the access token has
    expired (long runs outlive the configurator's short-lived access tokens).
    """

    def __init__(self, base_url: str, *, timeout: float = 30.0, max_connections: int = 20) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = httpx.AsyncClient(
            base_url=self.base_url + API_PREFIX,
            timeout=timeout,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> ConfiguratorClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def health(self) -> dict:
        response = await self.http.get(self.base_url + "/health")
        if response.status_code != 200:
            raise ApiError("GET", "/health", response.status_code, _body(response))
        return response.json()

    async def request(
        self,
        method: str,
        path: str,
        *,
        account: Account | None = None,
        expect: int | tuple[int, ...] = 200,
        relogin: bool = True,
        **kwargs: Any,
    ) -> Any:
        expected = (expect,) if isinstance(expect, int) else expect
        headers = dict(kwargs.pop("headers", {}) or {})
        if account is not None:
            headers.update(account.headers)
        response = await self.http.request(method, path, headers=headers, **kwargs)
        if response.status_code == 401 and account is not None and relogin and 401 not in expected:
            await self.login(account)
            headers.update(account.headers)
            response = await self.http.request(method, path, headers=headers, **kwargs)
        if response.status_code not in expected:
            raise ApiError(method, path, response.status_code, _body(response))
        return _body(response) if response.content else None

    # -- auth ----------------------------------------------------------------------------------
    async def register(self, username: str, email: str, password: str) -> Account:
        data = await self.request(
            "POST", "/auth/register", json={"username": username, "email": email, "password": password}, expect=201
        )
        return Account(
            username=username,
            email=email,
            password=password,
            account_id=data["account"]["id"],
            tenant_id=data["tenant"]["id"],
            access_token=data["tokens"]["access_token"],
            refresh_token=data["tokens"]["refresh_token"],
        )

    async def login(self, account: Account) -> None:
        data = await self.request(
            "POST", "/auth/login", json={"username": account.username, "password": account.password}, expect=200
        )
        account.access_token = data["tokens"]["access_token"]
        account.refresh_token = data["tokens"]["refresh_token"]

    async def login_status(self, username: str, password: str) -> int:
        """The status code of a login attempt (200 when it works)."""
        response = await self.http.post("/auth/login", json={"username": username, "password": password})
        return response.status_code

    # -- catalogue, agents, keys ---------------------------------------------------------------
    async def templates(self, account: Account) -> list[dict]:
        return (await self.request("GET", "/agent-templates", account=account, params={"limit": 200}))["items"]

    async def create_agent(self, account: Account, name: str, template_id: str | None, **extra: Any) -> dict:
        body = {"name": name, "template_id": template_id, **extra}
        return await self.request("POST", "/agents", account=account, json=body, expect=201)

    async def create_api_key(self, account: Account, agent_id: str, name: str = "integration") -> dict:
        return await self.request(
            "POST", f"/agents/{agent_id}/api-keys", account=account, json={"name": name}, expect=201
        )

    # -- history and stats ---------------------------------------------------------------------
    async def chat_streams(self, account: Account, agent_id: str) -> list[dict]:
        return await self._all(f"/agents/{agent_id}/chat-streams", account)

    async def messages(self, account: Account, stream_id: str) -> list[dict]:
        """Every message of a chat stream, oldest first (the API pages newest first)."""
        return list(reversed(await self._all(f"/chat-streams/{stream_id}/messages", account)))

    async def memories(self, account: Account, agent_id: str) -> list[dict]:
        return await self._all(f"/agents/{agent_id}/memories", account)

    async def add_memory(self, account: Account, agent_id: str, content: str, **where: Any) -> dict:
        return await self.request(
            "POST", f"/agents/{agent_id}/memories", account=account, json={"content": content, **where}, expect=201
        )

    async def stats(self, account: Account) -> dict:
        return await self.request("GET", "/tenant/stats", account=account)

    async def delete_tenant(self, account: Account) -> dict[str, int]:
        """`DELETE /tenant`: the tenant and all its data; the account stays."""
        return (await self.request("DELETE", "/tenant", account=account))["deleted"]

    async def delete_account(self, account: Account) -> dict[str, int]:
        """`DELETE /auth/me`: the account and the tenant it alone belongs to, with all their data."""
        response = await self.request("DELETE", "/auth/me", account=account, json={"password": account.password})
        return response["deleted"]

    async def _all(self, path: str, account: Account, page_size: int = 200) -> list[dict]:
        items: list[dict] = []
        offset: int | None = 0
        while offset is not None:
            page = await self.request("GET", path, account=account, params={"limit": page_size, "offset": offset})
            items.extend(page["items"])
            offset = page.get("next_offset")
        return items
