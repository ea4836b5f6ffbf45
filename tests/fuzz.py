"""The schemathesis loop every server's fuzz test runs (serve, generation, the assistant, the monitor, the
dashboard): schemathesis' pytest plugin does not run under this pytest, its Hypothesis strategies do."""
from __future__ import annotations

from collections.abc import Iterable


def fuzz_openapi(app, header_sets: Iterable[dict], max_examples: int, must_cover: set[str],
                 schema_headers: dict | None = None) -> list[tuple[str, int]]:
    """Calls every operation of the app's /openapi.json with generated cases, once per header set, asserting
    no 5xx; returns (path, status) of every call. must_cover: paths the schema must list."""
    import hypothesis
    import schemathesis
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, **({"headers": schema_headers} if schema_headers else {}))
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in operations} >= must_cover
    header_sets = list(header_sets)
    calls: list[tuple[str, int]] = []
    for op in operations:
        @hypothesis.given(case=op.as_strategy())
        @hypothesis.settings(max_examples=max_examples, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case):
            for headers in header_sets:
                response = case.call(headers=headers)
                calls.append((case.path, response.status_code))
                assert response.status_code < 500, (case.method, case.path, case.body, response.text)
        check()
    return calls
