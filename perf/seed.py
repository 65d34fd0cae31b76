"""Seed data for the load tests, written straight through the isolation layer (no HTTP).

    python -m perf.seed --tenants 20 --agents 5 [--database-url URL] [--out perf/seed.csv] [--password P]
    python -m perf.seed --cleanup [--prefix load_<run>_] [--database-url URL]   # delete load_* data

Creates `--tenants` tenants, each owned by an account `load_<run>_t<N>` whose password is `--password`
(hashed with the configurator's own Argon2 settings, so `POST /api/v1/auth/login` works), `--agents`
agents per tenant (offline LLM provider), one API key per agent, and one group chat stream per agent
with `--history` messages in it (so history reads have something to page through). Each tenant is
written in one transaction.

The CSV has one row per agent:
username, password, tenant_id, agent_id, api_key, platform, group_id, chat_stream_id
and the locust files give each simulated user its own row, so every user acts for its own
(tenant, agent, platform, chat). The file holds live API keys: it is written with mode 0600.

`--cleanup` runs `isolation.cleanup.delete_by_prefix("load_", force=True)` (accounts named `load_…` and the
tenants only they belong to) and prints the rows deleted per table.
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import sys
import time
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path

PREFIX = "load_"
DEFAULT_PASSWORD = "load-test-password-1"  # noqa: S105 - a throw-away account for load tests
DEFAULT_PLATFORM = "loadtest"
DEFAULT_OUT = Path(__file__).resolve().parent / "seed.csv"


@dataclass(frozen=True, slots=True)
class SeedRow:
    username: str
    password: str
    tenant_id: str
    agent_id: str
    api_key: str
    platform: str
    group_id: str
    chat_stream_id: str


COLUMNS = [f.name for f in fields(SeedRow)]


def _password_hash(password: str) -> str:
    """The configurator's own hasher and settings (Argon2id), so its login verifies the hash."""
    from configurator.core.config import get_settings
    from configurator.core.security import PasswordHasher

    return PasswordHasher(get_settings()).hash(password)


def _agent_fields(template_id: str) -> dict:
    """Persona, config and LLM settings as the configurator stores them (validated, template defaults)."""
    from isolation import system
    from isolation.agent_config import AgentConfig, LlmSettings, Persona

    template = system.get_template(template_id)
    return {
        "template_id": template_id,
        "persona": Persona(**(template["persona"] or {})).model_dump(mode="json"),
        "config": AgentConfig(**(template["config"] or {})).model_dump(mode="json"),
        "llm": LlmSettings(provider="offline").model_dump(mode="json"),
    }


def seed(
    tenants: int,
    agents: int,
    *,
    password: str = DEFAULT_PASSWORD,
    platform: str = DEFAULT_PLATFORM,
    history: int = 10,
    run_id: str | None = None,
    template_id: str = "friendly_assistant",
) -> list[SeedRow]:
    """Create the data in the configured database; returns one row per agent."""
    from isolation import IsolationContext, Scoped, system
    from isolation import db as isolation_db
    from isolation.ids import utcnow

    if tenants < 1 or agents < 1:
        raise ValueError("--tenants and --agents must be at least 1")
    run = run_id or secrets.token_hex(3)
    password_hash = _password_hash(password)  # one (slow) hash; every account gets its own copy
    agent_fields = _agent_fields(template_id)
    start = utcnow() - timedelta(seconds=history + 1)
    rows: list[SeedRow] = []
    for t in range(tenants):
        username = f"{PREFIX}{run}_t{t:04d}"
        with isolation_db.unit_of_work(write=True):
            account = system.create_account(username, f"{username}@load.example.com", password_hash)
            tenant = system.create_tenant(f"{username} workspace", account["id"], "enterprise")
            ctx = IsolationContext(tenant["id"])
            scoped = Scoped(ctx)
            for a in range(agents):
                agent = scoped.agents.create(name=f"load agent {a}", description="created by perf.seed", **agent_fields)
                _, secret = scoped.api_keys.create(agent["id"], name="load")
                group_id = f"{PREFIX}g_{run}_{t:04d}_{a:03d}"
                chat = ctx.child(agent_id=agent["id"], platform=platform)
                stream = Scoped(chat).chat_streams.get_or_create(group_id=group_id, group_name=f"load group {a}")
                messages = Scoped(chat.child(chat_stream_id=stream["id"])).messages
                for i in range(history):
                    direction = "in" if i % 2 == 0 else "out"
                    text = f"seed message {i}"
                    messages.add(
                        message_id=f"seed-{i}",
                        direction=direction,
                        text=text,
                        segments={"type": "text", "data": text},
                        sender_user_id="load-user" if direction == "in" else "maitenant-agent",
                        created_at=start + timedelta(seconds=i),
                    )
                rows.append(
                    SeedRow(username, password, tenant["id"], agent["id"], secret, platform, group_id, stream["id"])
                )
    return rows


def write_csv(rows: list[SeedRow], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(asdict(row))


def read_csv(path: str | Path) -> list[dict[str, str]]:
    """The rows of a seed CSV (used by the locust files)."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{path} has no rows: run `python -m perf.seed` first")
    missing = set(COLUMNS) - set(rows[0])
    if missing:
        raise ValueError(f"{path} lacks columns {sorted(missing)}: re-run `python -m perf.seed`")
    return rows


def cleanup(prefix: str = PREFIX) -> dict[str, int]:
    from isolation.cleanup import delete_by_prefix

    # The load accounts' own prefix, short on purpose (every seeded run): hence force.
    return delete_by_prefix(prefix, force=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.seed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tenants", type=int, default=10, help="tenants (one load_ account each)")
    parser.add_argument("--agents", type=int, default=5, help="agents per tenant (one API key and chat each)")
    parser.add_argument("--database-url", default=None, help="default: DATABASE_URL or sqlite:///data/maitenant.db")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"CSV to write (default {DEFAULT_OUT})")
    parser.add_argument("--password", default=DEFAULT_PASSWORD, help="password of every seeded account")
    parser.add_argument("--platform", default=DEFAULT_PLATFORM, help="platform of the seeded chats")
    parser.add_argument("--history", type=int, default=10, help="messages pre-seeded in each agent's chat stream")
    parser.add_argument("--run-id", default=None, help="names become load_<run-id>_t<N> (default: random)")
    parser.add_argument("--cleanup", action="store_true", help="delete the tenants and accounts named --prefix*")
    parser.add_argument("--prefix", default=PREFIX, help=f"with --cleanup (default {PREFIX!r}; must start with it)")
    args = parser.parse_args(argv)

    from isolation import db as isolation_db
    from isolation.config import get_base_settings
    from isolation.migrate import check_schema

    url = args.database_url or get_base_settings().database_url
    database = isolation_db.configure(url)
    check_schema(database)
    started = time.perf_counter()
    if args.cleanup:
        if not args.prefix.startswith(PREFIX):
            parser.error(f"--prefix must start with {PREFIX!r}")
        counts = cleanup(args.prefix)
        for table, count in sorted(counts.items()):
            print(f"{table:16s} {count:8d}")
        print(f"{'total':16s} {sum(counts.values()):8d}  ({time.perf_counter() - started:.1f} s)")
        return 0
    rows = seed(
        args.tenants,
        args.agents,
        password=args.password,
        platform=args.platform,
        history=args.history,
        run_id=args.run_id,
    )
    write_csv(rows, args.out)
    elapsed = time.perf_counter() - started
    print(
        f"seeded {args.tenants} tenants x {args.agents} agents = {len(rows)} agents/API keys/chat streams "
        f"(+{len(rows) * args.history} messages) in {elapsed:.1f} s -> {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
