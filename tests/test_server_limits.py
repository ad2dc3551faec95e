"""The limits a server is started with, on the tiny setup (uvicorn in a test thread): the
request body and prompt sizes, the API key and the admin key, the number of adapters, and a full queue."""

from __future__ import annotations

import json

import _server_fixtures as fixtures
from _server_fixtures import assert_error

# Fixtures the server's test files share: pytest finds them by these names.
setup, app_factory = fixtures.setup, fixtures.app_factory


def test_request_body_over_the_limit_is_413_whether_declared_or_streamed(app_factory):
    big = json.dumps({"prompt": "x" * 3000}).encode()
    with app_factory(max_request_bytes=2048) as c:
        r = c.post("/generate", content=big, headers={"content-type": "application/json"})
        assert assert_error(r, 413, "2048 bytes")["code"] == "too_large"
        chunked = c.post("/v1/completions", content=iter([big[:1500], big[1500:]]),
                         headers={"content-type": "application/json"})
        assert "content-length" not in chunked.request.headers
        assert assert_error(chunked, 413, "2048 bytes")["param"] is None  # the OpenAI shape on /v1
        assert c.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200


def test_prompt_over_the_token_limit_is_422_naming_the_field(app_factory):
    with app_factory(max_prompt_tokens=10) as c:
        assert_error(c.post("/generate", json={"prompt": "x" * 11}), 422, "prompt", "at most 10")
        assert_error(c.post("/generate", json={"messages": [{"role": "user", "content": "x" * 11}]}),
                     422, "messages")
        assert c.post("/generate", json={"prompt": "x" * 5, "max_new_tokens": 2}).status_code == 200


def test_api_key_is_required_on_every_route_but_health(app_factory):
    with app_factory(api_key="sesame") as c:
        assert c.get("/health").status_code == 200
        assert assert_error(c.get("/adapters"), 401)["type"] == "authentication_error"
        assert_error(c.post("/generate", json={"prompt": "hi"},
                            headers={"Authorization": "Bearer wrong"}), 401)
        for path in ("/docs", "/openapi.json", "/redoc", "/metrics", "/v1/models", "/no/such/route"):
            assert_error(c.get(path), 401)
        # The key is checked before the body is read: a malformed body is a 401, not a 422.
        assert_error(c.post("/generate", content=b"{not json", headers={"content-type": "application/json"}), 401)
        assert c.get("/openapi.json", headers={"Authorization": "Bearer sesame"}).status_code == 200
        ok = c.post("/generate", json={"prompt": "hi", "max_new_tokens": 2},
                    headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200


def test_admin_key_is_required_to_load_and_unload_adapters(app_factory):
    with app_factory(api_key="sesame", admin_key="root") as c:
        user, admin = {"Authorization": "Bearer sesame"}, {"Authorization": "Bearer root"}
        load = {"id": "copy", "path": "tiny"}
        assert_error(c.post("/adapters", json=load, headers=user), 403, "admin")
        assert_error(c.delete("/adapters/tiny", headers=user), 403)
        assert c.get("/adapters", headers=user).status_code == 200
        assert c.post("/adapters", json=load, headers=admin).status_code == 201
        assert c.delete("/adapters/copy", headers=admin).status_code == 200


def test_the_adapter_limit_refuses_one_more_with_409(app_factory):
    with app_factory(max_adapters=1) as c:  # `tiny` is loaded at start
        assert_error(c.post("/adapters", json={"id": "b", "path": "more/tiny-b"}), 409, "limit of 1")
        assert c.post("/adapters", json={"id": "tiny", "path": "more/tiny-b", "replace": True}).status_code == 201
        assert c.delete("/adapters/tiny").status_code == 200
        assert c.post("/adapters", json={"id": "b", "path": "more/tiny-b"}).status_code == 201


def test_full_queue_answers_503_with_retry_after_at_once(app_factory):
    with app_factory(max_queue=1) as c:
        engine = c.app_state["fsrl"].engine
        engine.pending = engine.max_pending  # as if a request were running
        try:
            r = c.post("/generate", json={"prompt": "hi", "stream": True})
            assert_error(r, 503)
            assert r.headers["retry-after"] == "1"
        finally:
            engine.pending = 0
