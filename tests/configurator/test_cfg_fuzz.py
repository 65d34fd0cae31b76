"""Property-based fuzzing of the whole OpenAPI schema with schemathesis (4.x), authenticated.

Every generated case must get no 5xx and a response that conforms to the documented schema (status
code, content type, body). The number of cases is printed at the end of the module (and written to
`$CONFIGURATOR_FUZZ_REPORT` when set). `CONFIGURATOR_FUZZ_EXAMPLES` sets examples per operation.
"""

from __future__ import annotations

import json
import os

import pytest
import schemathesis
from cfg_helpers import create_agent, register
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import negative_data_rejection, positive_data_acceptance

from configurator.core.config import Settings
from configurator.main import create_app

# Heuristic checks left out, on purpose:
# * positive_data_acceptance: the schema cannot say "no NUL characters / lone surrogates" inside free
#   JSON (tenant settings, persona texts), which the API rightly refuses with 422 (PostgreSQL cannot
#   store NUL in text);
# * negative_data_rejection: unknown query parameters are ignored, as most HTTP APIs do.
# Everything else runs: no 5xx, documented status codes, content types, headers and response schemas.
EXCLUDED_CHECKS = [positive_data_acceptance, negative_data_rejection]
MAX_EXAMPLES = int(os.environ.get("CONFIGURATOR_FUZZ_EXAMPLES", "60"))


class FuzzState:
    def __init__(self, client) -> None:
        self.client = client
        self.cases = 0
        self.statuses: dict[int, int] = {}
        self.unauthorized: dict[str, int] = {}
        self.user = None
        self.renew()

    def renew(self) -> None:
        self.user = register(self.client, prefix="fz")
        create_agent(self.client, self.user)  # some data to act on

    @property
    def headers(self) -> dict[str, str]:
        return self.user.headers


@pytest.fixture(scope="module")
def fuzz_state(client, request):
    state = FuzzState(client)
    yield state
    summary = {
        "cases": state.cases,
        "statuses": dict(sorted(state.statuses.items())),
        "unauthorized_by_operation": state.unauthorized,
    }
    line = f"schemathesis: {state.cases} cases, statuses {summary['statuses']}"
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if capture is not None:
        with capture.global_and_fixture_disabled():
            print("\n" + line)
    else:
        print(line)
    if os.environ.get("CONFIGURATOR_FUZZ_REPORT"):
        with open(os.environ["CONFIGURATOR_FUZZ_REPORT"], "a") as out:
            out.write(json.dumps({"db": os.environ.get("MAITENANT_TEST_DB", "sqlite"), **summary}) + "\n")


@pytest.fixture(scope="module")
def api_schema(app, client):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def _operations() -> list[tuple[str, str]]:
    """(METHOD, path) of every operation, read from the app's OpenAPI at collection time (no database)."""
    spec = create_app(Settings(database_url="sqlite:///:memory:")).openapi()
    methods = ("get", "post", "put", "patch", "delete")
    return [(m.upper(), path) for path, item in spec["paths"].items() for m in methods if m in item]


# schemathesis' own pytest integration (`from_fixture(...).parametrize()`) does not support pytest 9
# yet, so each operation is a parametrized test that drives Hypothesis with the operation's strategy.
@pytest.mark.parametrize(("method", "path"), _operations(), ids=lambda v: v)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_openapi_fuzz(api_schema, fuzz_state, method, path, mode):
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case):
        response = case.call_and_validate(headers=fuzz_state.headers, excluded_checks=EXCLUDED_CHECKS)
        fuzz_state.cases += 1
        fuzz_state.statuses[response.status_code] = fuzz_state.statuses.get(response.status_code, 0) + 1
        if response.status_code == 401:
            label = f"{method} {path}"
            fuzz_state.unauthorized[label] = fuzz_state.unauthorized.get(label, 0) + 1
        assert response.status_code < 500
        if method == "DELETE" and path == "/api/v1/tenant" and response.status_code == 200:
            fuzz_state.renew()  # the fuzzer deleted our tenant: carry on with a fresh one

    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.NEGATIVE and not _has_inputs(api_schema, path, method):
            pytest.skip("the operation has no inputs to make invalid")
        raise


def _has_inputs(api_schema, path: str, method: str) -> bool:
    raw = api_schema.raw_schema["paths"][path][method.lower()]
    return bool(raw.get("parameters") or raw.get("requestBody"))
