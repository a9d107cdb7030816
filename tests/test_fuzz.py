"""Fuzz the review server's published OpenAPI with schemathesis (bounded): a real server
process on a copy of the test store; no request may get a 5xx.

schemathesis' pytest plugin does not load under pytest 9, so the test drives its
hypothesis strategies (one per operation of the schema) directly.
"""

from __future__ import annotations

import shutil

import pytest

from tests.test_review import Server, add_user

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

EXAMPLES = 20  # per operation, valid and invalid inputs: a few hundred requests in all


@pytest.fixture(scope="module")
def fuzz_server(base_store, tmp_path_factory):
    store = tmp_path_factory.mktemp("fuzz") / "slide.zarr"
    shutil.copytree(base_store, store)
    token = add_user(store, "fuzzer", "admin")
    server = Server(store)
    yield server, token
    server.stop()


def test_openapi_fuzz_no_server_errors(fuzz_server):
    server, token = fuzz_server
    auth = {"Authorization": f"Bearer {token}"}
    schema = schemathesis.openapi.from_url(f"{server.base}/api/openapi.json", headers=auth)
    errors: list[str] = []
    statuses: list[int] = []
    operations = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if op.path.endswith("/live"):  # a WebSocket, not a request/response route
            continue
        operations += 1
        # random everything, and the same with the real image name so handlers are reached
        real = {"image": "slide"} if "{image}" in op.path else None
        strategies = [
            op.as_strategy(mode, path_parameters=fixed)
            for mode in GenerationMode
            for fixed in (None, real)
        ]

        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=st.one_of(strategies))
        def run(case) -> None:
            response = case.call(base_url=server.base, headers=auth, timeout=30)
            statuses.append(response.status_code)
            if response.status_code >= 500:
                errors.append(f"{case.method} {case.formatted_path}: {response.text[:200]}")

        run()
    assert operations >= 15 and len(statuses) > 10 * operations
    assert {200, 400, 404} <= set(statuses), sorted(set(statuses))  # handlers + validators
    assert errors == []
