"""The OpenAPI schema and docs/api.md state the bounds the server enforces (the constants the
server checks them with)."""

import re
from pathlib import Path

import pytest

from fsrl.overrides import MAX_FEATURE_OVERRIDES, MAX_FEATURE_VALUE, MAX_RETURN_FEATURES, MAX_STEERING_SCALE
from server.openai_schemas import MAX_LOGPROBS, MAX_N
from server.schemas import MAX_MESSAGES, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def schemas() -> dict:
    from server.app import create_app
    from server.settings import Settings

    return create_app(Settings()).openapi()["components"]["schemas"]  # no model is loaded for this


def prop(schemas: dict, model: str, field: str) -> dict:
    """A field's schema, with an Optional's non-null branch."""
    p = schemas[model]["properties"][field]
    branches = [b for b in p.get("anyOf", [p]) if b.get("type") != "null"]
    return branches[0]


def test_generate_bounds_are_in_the_schema(schemas):
    assert prop(schemas, "GenerateBody", "steering_scale")["maximum"] == MAX_STEERING_SCALE
    assert prop(schemas, "GenerateBody", "steering_scale")["minimum"] == -MAX_STEERING_SCALE
    assert prop(schemas, "GenerateBody", "features")["maxItems"] == MAX_FEATURE_OVERRIDES
    assert prop(schemas, "FeatureIn", "value")["maximum"] == MAX_FEATURE_VALUE
    assert prop(schemas, "FeatureIn", "value")["minimum"] == -MAX_FEATURE_VALUE
    assert prop(schemas, "GenerateBody", "temperature")["maximum"] == MAX_TEMPERATURE
    assert prop(schemas, "GenerateBody", "stop")["maxItems"] == MAX_STOP_STRINGS
    assert prop(schemas, "GenerateBody", "stop")["items"]["maxLength"] == MAX_STOP_CHARS
    assert prop(schemas, "GenerateBody", "return_features")["maximum"] == MAX_RETURN_FEATURES
    assert prop(schemas, "GenerateBody", "messages")["maxItems"] == MAX_MESSAGES
    assert schemas["GenerateBody"]["additionalProperties"] is False


def test_openai_bounds_are_in_the_schema(schemas):
    for body in ("ChatCompletionBody", "CompletionBody"):
        assert prop(schemas, body, "n")["maximum"] == MAX_N
        assert prop(schemas, body, "temperature")["maximum"] == MAX_TEMPERATURE
    assert prop(schemas, "CompletionBody", "logprobs")["maximum"] == MAX_LOGPROBS
    assert prop(schemas, "ChatCompletionBody", "top_logprobs")["maximum"] == MAX_LOGPROBS


def doc_row(field: str) -> str:
    """The docs/api.md table row that starts with this field."""
    rows = [line for line in (REPO / "docs" / "api.md").read_text().splitlines()
            if line.startswith(f"| `{field}` ")]
    assert rows, f"docs/api.md has no row for {field}"
    return rows[0]


@pytest.mark.parametrize("field,bounds", [
    ("steering_scale", [f"{MAX_STEERING_SCALE:g}"]),
    ("features", [str(MAX_FEATURE_OVERRIDES)]),
    ("features[].value", [f"{MAX_FEATURE_VALUE:g}"]),
    ("temperature", [f"{MAX_TEMPERATURE:g}", "1e-5"]),
    ("stop", [str(MAX_STOP_STRINGS), str(MAX_STOP_CHARS)]),
    ("return_features", [str(MAX_RETURN_FEATURES)]),
    ("messages", [f"{MAX_MESSAGES}"]),
    ("n", [str(MAX_N)]),
    ("top_logprobs", [str(MAX_LOGPROBS)]),
])
def test_docs_state_each_bound(field, bounds):
    row = doc_row(field)
    for bound in bounds:
        assert bound in row, (field, bound, row)


def test_every_route_in_the_schema_is_documented_and_none_is_listed_as_planned(schemas):
    from server.app import create_app
    from server.settings import Settings

    def norm(path: str) -> str:
        return re.sub(r"\{[^}]*\}", "{}", path)

    paths = create_app(Settings()).openapi()["paths"]
    served = {(method.upper(), norm(path)) for path, ops in paths.items() for method in ops}
    served_text, _, planned = (REPO / "docs" / "api.md").read_text().partition("## Planned (not yet served)")
    route = r"\b(GET|POST|DELETE|PUT|PATCH) (/[^\s`?,)\]]*)"
    documented = {(m, norm(p)) for m, p in re.findall(route, served_text)}
    assert served - documented == set()
    assert served & {(m, norm(p)) for m, p in re.findall(route, planned)} == set()
