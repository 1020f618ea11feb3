"""The C-STORE node's listening socket, with DICOM TLS (PS3.15 Annex B) when ``--tls-cert`` and ``--tls-key`` are given.

pynetdicom can wrap accepted sockets itself (``start_server(ssl_context=...)``), but it does the
TLS handshake in the one thread that accepts connections, with no time limit: a peer that opens a
TCP connection and says nothing would stop every other sender from connecting, and a failed
handshake vanishes without a word. Here the accept thread only accepts; each connection's own
thread does the handshake, within :data:`HANDSHAKE_TIMEOUT_S`, and a connection that fails it
(plain TCP to a TLS-only port, a client certificate --tls-ca did not sign, no certificate when one
is required) is closed before any DICOM is read, with one log line naming the peer's address and
why, and the ``refused`` callback (the audit trail's Security Alert). The association that follows
runs in that thread as pynetdicom runs it.
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

HANDSHAKE_TIMEOUT_S = 10.0
STOP_POLL_S = 0.05
# OpenSSL's reasons, in words a PACS administrator acts on.
HANDSHAKE_REASONS = {
    "WRONG_VERSION_NUMBER": "not a TLS connection (plain TCP to a TLS-only port: turn on TLS at the sender)",
    "HTTP_REQUEST": "not a TLS connection (plain TCP to a TLS-only port: turn on TLS at the sender)",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection during the TLS handshake",
    "CERTIFICATE_VERIFY_FAILED": "its client certificate is not signed by --tls-ca",
    "TLSV1_ALERT_UNKNOWN_CA": "it does not trust this node's certificate (give it the CA that signed --tls-cert)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "it sent no client certificate, and --tls-require-client-cert is set",
    "UNSUPPORTED_PROTOCOL": "it offered a TLS version older than 1.2",
    "TLSV1_ALERT_PROTOCOL_VERSION": "it offered a TLS version older than 1.2",
}


def handshake_failure(error: BaseException) -> str:
    """Why a TLS handshake failed, in words (the OpenSSL reason when it is not one of :data:`HANDSHAKE_REASONS`)."""
    if isinstance(error, TimeoutError | socket.timeout):
        return f"no TLS handshake within {HANDSHAKE_TIMEOUT_S:g} s"
    reason = getattr(error, "reason", None)
    if reason in HANDSHAKE_REASONS:
        return HANDSHAKE_REASONS[reason]
    return f"TLS handshake failed ({reason or type(error).__name__})"


def peer_identity(connection: Any) -> str | None:
    """The subject's common name of the client certificate the peer showed over TLS, or None (plain TCP, or no certificate)."""
    getpeercert = getattr(connection, "getpeercert", None)
    certificate = getpeercert() if getpeercert is not None else None
    for entry in (certificate or {}).get("subject", ()):
        for key, value in entry:
            if key == "commonName":
                return str(value)
    return None


class HandshakingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the TLS handshake moved into each connection's thread (see the module docstring)."""

    def __init__(self, *args: Any, tls: ssl.SSLContext, refused: Callable[[str, str], None], **kwargs: Any) -> None:
        # pynetdicom's own wrapping stays off (ssl_context None); ``tls`` is applied per connection below.
        self.tls, self.refused = tls, refused
        super().__init__(*args, **kwargs)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the handshake, then the association; a failed handshake is refused and closed."""
        host = str(client_address[0])
        try:
            request.settimeout(HANDSHAKE_TIMEOUT_S)
            connection = self.tls.wrap_socket(request, server_side=True)
            connection.settimeout(None)  # as pynetdicom's accepted sockets are: its reactor polls with its own timeouts
        except (OSError, ssl.SSLError) as error:
            self.refused(host, handshake_failure(error))
            self.shutdown_request(request)
            return
        super().process_request_thread(connection, client_address)


def start_listening(
    ae: Any,
    address: tuple[str, int],
    *,
    evt_handlers: list[Any],
    tls: ssl.SSLContext | None,
    refused: Callable[[str, str], None],
) -> Any:
    """Listen on ``address`` without blocking, as ``ae.start_server(block=False)`` does; with ``tls``, TLS only (see the module docstring).

    The accept loop polls for a stop every :data:`STOP_POLL_S` rather than socketserver's 0.5 s, so the node stops promptly.
    """
    if tls is None:
        server = ae.make_server(address, evt_handlers=evt_handlers, server_class=ThreadedAssociationServer)
    else:
        server = ae.make_server(
            address, evt_handlers=evt_handlers, server_class=HandshakingServer, tls=tls, refused=refused
        )
    threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": STOP_POLL_S}, name="lungdet-acceptor", daemon=True
    ).start()
    # server.shutdown() removes the server from this list, as it does for start_server's servers.
    ae._servers.append(server)
    return server
