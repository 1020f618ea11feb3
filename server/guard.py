"""The server's outer gate: the API token and the upload size limit, checked before any body is read.

A FastAPI dependency or route runs only after the whole multipart body has been received and
parsed, so a check there would let a client without the token, or with a 10 GB upload, make
the server read all of it first. :class:`RequestGuard` is plain ASGI around the app instead:

- with a token set, a request under ``/api/`` without ``Authorization: Bearer TOKEN`` gets
  401 before the app sees it (the page and its static files stay public: they carry no data);
- a ``Content-Length`` over the limit gets 413 before the body is read; a body streamed without
  one (chunked) is counted as it arrives and gets 413 as soon as it passes the limit.

A refused body is never parsed or kept. What the client goes on sending after the refusal is
read and dropped, within bounds, so that the refusal reaches it (see ``RequestGuard._refuse``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PROTECTED_PREFIX = "/api/"
# How long a refused client may pause while the rest of its upload is read and dropped (see RequestGuard._refuse).
DRAIN_IDLE_SECONDS = 2.0


def token_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header value is ``Bearer <token>``, compared in constant time.

    ``hmac.compare_digest`` takes as long for a wrong first character as for a wrong last one,
    so response times do not reveal how much of a guess was right.
    """
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        presented = ""
    return hmac.compare_digest(presented.strip().encode("utf-8"), token.encode("utf-8"))


def error_body(status: int, kind: str, message: str) -> bytes:
    """The JSON every refusal of this server has: ``{"error": {"status", "kind", "message"}}``."""
    return json.dumps({"error": {"status": status, "kind": kind, "message": message}}).encode("utf-8")


class _BodyTooLarge(Exception):
    """Raised from ``receive`` once the body passes the limit; the app's own error handling may swallow it, so a flag backs it up."""


class RequestGuard:
    """ASGI middleware: bearer token on ``/api/`` (when ``api_token`` is set) and at most ``max_body_bytes`` of request body."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, api_token: str | None = None) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_token = api_token or None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope.get("headers", [])}
        # A client that asked to wait ('Expect: 100-continue') sends no body after a refusal: nothing to drain.
        body_on_its_way = headers.get("expect", "").lower() != "100-continue" and (
            headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        )
        if (
            self.api_token is not None
            and scope["path"].startswith(PROTECTED_PREFIX)
            and not token_matches(headers.get("authorization"), self.api_token)
        ):
            await self._refuse(
                send,
                receive if body_on_its_way else None,
                401,
                "unauthorized",
                "this server needs an API token: send the header 'Authorization: Bearer TOKEN' (the token lungdet serve was started with)",
                extra_headers=[(b"www-authenticate", b'Bearer realm="lungdet"')],
            )
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse(
                send,
                receive if body_on_its_way else None,
                413,
                "too_large",
                self._too_large_message(f"declares {int(declared):,} bytes"),
            )
            return
        await self._guard_stream(scope, receive, send)

    def _too_large_message(self, what: str) -> str:
        return (
            f"the upload {what}, over this server's limit of {self.max_body_bytes:,} bytes "
            f"({self.max_body_bytes / 2**20:g} MB); send a smaller file, or start lungdet serve with a larger --max-upload-mb"
        )

    async def _guard_stream(self, scope: Scope, receive: Receive, send: Send) -> None:
        received = 0
        exceeded = False
        body_complete = False
        response_started = False

        async def counted_receive() -> Message:
            nonlocal received, exceeded, body_complete
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_complete = not message.get("more_body", False)
                if received > self.max_body_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def checked_send(message: Message) -> None:
            nonlocal response_started
            if exceeded:
                return  # the app's reply to a body it could not finish reading is replaced by the 413 below
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, checked_send)
        except _BodyTooLarge:
            pass
        if exceeded and not response_started:
            await self._refuse(
                send,
                None if body_complete else receive,
                413,
                "too_large",
                self._too_large_message(f"passed {self.max_body_bytes:,} bytes while streaming in"),
            )

    async def _refuse(
        self,
        send: Send,
        drain_from: Receive | None,
        status: int,
        kind: str,
        message: str,
        *,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Send the refusal; with ``drain_from``, read and drop what the client is still sending before ending the reply.

        The whole refusal goes out first, so the client can read it at once. Closing a connection
        with unread data makes the kernel send a reset, which can destroy a reply the client has not
        read yet: a client still uploading would see 'connection reset' instead of the 401 or 413. So
        the rest of the body is read and thrown away (nothing is kept or parsed), at most another
        ``max_body_bytes`` and until the client pauses for :data:`DRAIN_IDLE_SECONDS`.
        """
        body = error_body(status, kind, message)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *(extra_headers or []),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": drain_from is not None})
        if drain_from is None:
            return
        drained = 0
        while drained <= self.max_body_bytes:
            try:
                piece = await asyncio.wait_for(drain_from(), DRAIN_IDLE_SECONDS)
            except TimeoutError:
                break
            if piece["type"] != "http.request":
                break
            drained += len(piece.get("body", b""))
            if not piece.get("more_body", False):
                break
        await send({"type": "http.response.body", "body": b"", "more_body": False})
