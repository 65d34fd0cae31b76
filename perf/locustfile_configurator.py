"""Locust load test of the configurator's REST API across many tenants.

    python -m perf.seed --tenants 20 --agents 5 --database-url URL          # once, against the same database
    locust -f perf/locustfile_configurator.py --host http://127.0.0.1:8000 \
        --headless -u 20 -r 10 -t 30s --csv reports/load/configurator --seed-csv perf/seed.csv

Each simulated user takes its own row of the seed CSV (see perf/load_common.py), signs in as that
row's `load_` account and works on that row's tenant, agent and chat stream. The weighted mix follows
what a dashboard does: mostly reads (agents, one agent, chat streams, history pages, stats, keys), now
and then an API key created and revoked, rarely a fresh login (Argon2id: deliberately expensive).
Anything but a 2xx is a failure; a 401 also signs the user in again.

Uses `FastHttpUser` (locust's geventhttpclient-based HTTP user): on a 2-core machine shared with the
servers, the client's CPU cost per request matters, and it is several times lower than `HttpUser`'s.
"""

from __future__ import annotations

from locust import FastHttpUser, task

from perf.load_common import take_row, think_time

API = "/api/v1"


class ConfiguratorUser(FastHttpUser):
    # Think time between tasks (override with --wait-min/--wait-max).
    def wait_time(self) -> float:
        return think_time(self.environment, 0.2, 1.0)

    def on_start(self) -> None:
        self.row = take_row(self.environment)
        self.agent_id = self.row["agent_id"]
        self.stream_id = self.row["chat_stream_id"]
        self.token: str | None = None
        self.login()

    # -- helpers ---------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _call(self, method: str, path: str, name: str, json: dict | None = None, expect: int | None = None):
        """One request; non-2xx (or not `expect`) is a failure. Returns the decoded JSON body or None."""
        with self.client.request(
            method, API + path, name=name, json=json, headers=self._headers(), catch_response=True
        ) as response:
            status = response.status_code or 0
            ok = (status == expect) if expect is not None else 200 <= status < 300
            if not ok:
                detail = (response.text or "")[:200] if response.text else str(response.error)
                response.failure(f"HTTP {status}: {detail}")
                if status == 401 and name != "auth/login":
                    self.token = None
                return None
            if status == 204 or not response.content:
                return {}
            try:
                return response.json()
            except ValueError as exc:
                response.failure(f"invalid JSON: {exc}")
                return None

    def _ensure_login(self) -> bool:
        if self.token is None:
            self.login()
        return self.token is not None

    # -- the mix ---------------------------------------------------------------------------------
    @task(1)
    def login(self) -> None:
        body = self._call(
            "POST",
            "/auth/login",
            "auth/login",
            json={"username": self.row["username"], "password": self.row["password"]},
        )
        if body is not None:
            self.token = body["tokens"]["access_token"]

    @task(20)
    def list_agents(self) -> None:
        if self._ensure_login():
            self._call("GET", "/agents?limit=20", "agents (list)")

    @task(15)
    def get_agent(self) -> None:
        if self._ensure_login():
            self._call("GET", f"/agents/{self.agent_id}", "agents/{id}")

    @task(8)
    def list_chat_streams(self) -> None:
        if self._ensure_login():
            self._call("GET", f"/agents/{self.agent_id}/chat-streams?limit=20", "agents/{id}/chat-streams")

    @task(15)
    def read_history(self) -> None:
        if self._ensure_login():
            self._call("GET", f"/chat-streams/{self.stream_id}/messages?limit=20", "chat-streams/{id}/messages")

    @task(8)
    def tenant_stats(self) -> None:
        if self._ensure_login():
            self._call("GET", "/tenant/stats", "tenant/stats")

    @task(4)
    def me(self) -> None:
        if self._ensure_login():
            self._call("GET", "/auth/me", "auth/me")

    @task(4)
    def list_api_keys(self) -> None:
        if self._ensure_login():
            self._call("GET", f"/agents/{self.agent_id}/api-keys?limit=20", "agents/{id}/api-keys (list)")

    @task(3)
    def create_and_revoke_api_key(self) -> None:
        if not self._ensure_login():
            return
        created = self._call(
            "POST",
            f"/agents/{self.agent_id}/api-keys",
            "agents/{id}/api-keys (create)",
            json={"name": "load-rotating"},
            expect=201,
        )
        if created:
            self._call("POST", f"/api-keys/{created['id']}/revoke", "api-keys/{id}/revoke")
