"""Tests for server/guard.py at the ASGI level: what is refused, and that it is refused before the body is read."""

from __future__ import annotations

import asyncio
import json

import pytest

from lungdet.server.guard import RequestGuard, token_matches

LIMIT = 1000


class EchoApp:
    """A stand-in app that reads the whole body and answers 200 with its length; records what it saw."""

    def __init__(self) -> None:
        self.called = False

    async def __call__(self, scope, receive, send) -> None:
        self.called = True
        size = 0
        while True:
            message = await receive()
            size += len(message.get("body", b""))
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(size).encode()})


class SwallowingApp(EchoApp):
    """Like FastAPI's body parsing: an error while reading becomes the app's own 400."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except Exception:
            await send({"type": "http.response.start", "status": 400, "headers": []})
            await send({"type": "http.response.body", "body": b"There was an error parsing the body"})


def run(
    guard: RequestGuard,
    *,
    path: str = "/api/v1/detect",
    headers: dict[str, str] | None = None,
    chunks: list[bytes] | None = None,
):
    """Drive ``guard`` with one request; returns (status, JSON or text body, timeline).

    The timeline lists, in order, ``("pull", bytes)`` for every body chunk taken from the client
    and ``("reply", body)`` for every piece of the response body sent.
    """
    pending = list(chunks or [b""])
    timeline: list[tuple[str, bytes]] = []
    sent: list[dict] = []

    async def receive():
        if not pending:
            return {"type": "http.disconnect"}
        body = pending.pop(0)
        timeline.append(("pull", body))
        return {"type": "http.request", "body": body, "more_body": bool(pending)}

    async def send(message):
        sent.append(message)
        if message["type"] == "http.response.body":
            timeline.append(("reply", message.get("body", b"")))

    scope = {
        "type": "http",
        "path": path,
        "headers": [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()],
    }
    asyncio.run(guard(scope, receive, send))
    starts = [message for message in sent if message["type"] == "http.response.start"]
    assert len(starts) == 1, sent  # exactly one response, never the app's and the guard's both
    assert not sent[-1].get("more_body", False)  # and it was finished
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    try:
        return starts[0]["status"], json.loads(body), timeline
    except ValueError:
        return starts[0]["status"], body.decode(), timeline


def pulled(timeline: list[tuple[str, bytes]]) -> list[bytes]:
    return [data for kind, data in timeline if kind == "pull"]


def refusal_position(timeline: list[tuple[str, bytes]]) -> int:
    """Index in the timeline of the reply piece that carries the whole refusal."""
    return next(
        index for index, (kind, data) in enumerate(timeline) if kind == "reply" and data.startswith(b'{"error"')
    )


def test_token_matches_only_the_exact_bearer_token() -> None:
    assert token_matches("Bearer abc", "abc")
    assert token_matches("bearer abc", "abc")  # the scheme is case-insensitive (RFC 9110)
    for header in (None, "", "abc", "Bearer", "Bearer ab", "Bearer abcd", "Basic abc", "Token abc"):
        assert not token_matches(header, "abc"), header


def test_missing_token_is_refused_before_the_app_runs() -> None:
    app = EchoApp()
    status, body, timeline = run(
        RequestGuard(app, max_body_bytes=LIMIT, api_token="tok"), headers={"Content-Length": "10"}, chunks=[b"x" * 10]
    )
    assert status == 401 and body["error"]["kind"] == "unauthorized"
    assert not app.called
    # The whole refusal went out before the body the client was sending was read (and dropped).
    assert refusal_position(timeline) == 0 and pulled(timeline) == [b"x" * 10]


def test_a_client_waiting_for_100_continue_is_not_drained() -> None:
    headers = {"Content-Length": "10", "Expect": "100-continue"}
    status, _, timeline = run(
        RequestGuard(EchoApp(), max_body_bytes=LIMIT, api_token="tok"), headers=headers, chunks=[b"x" * 10]
    )
    assert status == 401 and pulled(timeline) == []


def test_token_guards_the_api_only() -> None:
    app = EchoApp()
    status, _, _ = run(RequestGuard(app, max_body_bytes=LIMIT, api_token="tok"), path="/static/app.js")
    assert status == 200 and app.called
    status, _, _ = run(
        RequestGuard(EchoApp(), max_body_bytes=LIMIT, api_token="tok"), headers={"Authorization": "Bearer tok"}
    )
    assert status == 200


def test_declared_length_over_the_limit_is_refused_before_reading() -> None:
    app = EchoApp()
    chunks = [b"x" * 300] * 4
    status, body, timeline = run(
        RequestGuard(app, max_body_bytes=LIMIT), headers={"Content-Length": str(LIMIT + 200)}, chunks=chunks
    )
    assert status == 413 and body["error"]["kind"] == "too_large"
    assert "declares 1,200 bytes, over this server's limit of 1,000 bytes" in body["error"]["message"]
    assert not app.called
    assert refusal_position(timeline) == 0 and len(pulled(timeline)) == 4


def test_streamed_body_is_cut_off_once_it_passes_the_limit() -> None:
    app = SwallowingApp()
    chunks = [b"x" * 400] * 10  # 4,000 bytes in all, without a Content-Length
    status, body, timeline = run(
        RequestGuard(app, max_body_bytes=LIMIT), headers={"Transfer-Encoding": "chunked"}, chunks=chunks
    )
    assert status == 413 and "passed 1,000 bytes while streaming in" in body["error"]["message"]
    # The app got 1,200 bytes; the refusal went out right then; at most another limit's worth was drained, the rest never read.
    assert refusal_position(timeline) == 3
    assert len(pulled(timeline)) == 6


def test_body_at_the_limit_passes() -> None:
    status, body, _ = run(
        RequestGuard(EchoApp(), max_body_bytes=LIMIT),
        headers={"Content-Length": str(LIMIT)},
        chunks=[b"x" * 600, b"x" * 400],
    )
    assert (status, body) == (200, LIMIT)


@pytest.mark.parametrize("scope_type", ["lifespan", "websocket"])
def test_other_scopes_pass_through(scope_type: str) -> None:
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(RequestGuard(app, max_body_bytes=1, api_token="tok")({"type": scope_type}, None, None))
    assert seen == [scope_type]
