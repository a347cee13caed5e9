"""OpenAPI-driven fuzzing of the live server (issue 13): schemathesis generates requests for
every route from the app's own OpenAPI document, valid and invalid, and checks that no
answer is a 5xx and that every answer matches the documented status codes, content type
and body schema. Bounded (a fixed number of examples per route, derandomized, so the same
cases run every time) to stay within a few seconds per route on the tiny model."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from crossrank.server import ServerSettings, create_app
from crossrank.server.runner import BackgroundServer

pytestmark = pytest.mark.timeout(600)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def live(tiny_reranker):
    app = create_app(tiny_reranker, ServerSettings(max_docs=64, max_body_bytes=256 * 1024))
    with BackgroundServer(app) as srv:
        srv.wait_ready()
        yield srv


def _unused_factory():
    raise AssertionError("the schema is built without loading a model")


# The OpenAPI document does not depend on the model: build it without one, at collection.
schema = schemathesis.openapi.from_dict(create_app(_unused_factory).openapi())


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_no_5xx_and_responses_match_the_schema(case, live):
    response = case.call(base_url=live.url, timeout=60)
    case.validate_response(response, checks=CHECKS)
