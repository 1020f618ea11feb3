"""TLS contexts for lungdet's network ends: the C-STORE node (DICOM TLS, PS3.15 Annex B) and ``lungdet serve`` (HTTPS).

Both ends take the certificates a hospital issues: the node's own certificate and key, and the CA
bundle it trusts for its peers. What every context here does, whoever uses it:

- TLS 1.2 at least (PS3.15's BCP 195 profiles); older protocols are refused in the handshake.
- A key file that its group or others can read is refused before it is loaded, with the chmod
  that fixes it: a private key is only private while one account can read it.
- A client context checks the peer's certificate against the CA bundle, host name included.
- A file that is missing, or a certificate and key that do not belong together, is one
  LungdetError naming the file and the flag, not an OpenSSL traceback.
"""

from __future__ import annotations

import os
import ssl
import stat
from pathlib import Path

from lungdet.errors import LungdetError

MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2


def check_key_file(path: Path, *, flag: str = "--tls-key") -> None:
    """Refuse a private key that is missing, or that its group or other users may read (the fix: ``chmod 600``)."""
    try:
        mode = Path(path).stat().st_mode
    except OSError as error:
        raise LungdetError(f"{flag} {path}: cannot be read ({error.strerror or error})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise LungdetError(
            f"{flag} {path}: the private key can be read by other users (mode {stat.S_IMODE(mode):03o}); "
            f"make it readable by this account only: chmod 600 {path}"
        )


def _check_readable(path: Path, flag: str) -> None:
    if not os.access(path, os.R_OK) or not Path(path).is_file():
        raise LungdetError(f"{flag} {path}: no such file, or it cannot be read")


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    _check_readable(cert, "--tls-cert")
    check_key_file(key)
    try:
        context.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as error:
        raise LungdetError(
            f"--tls-cert {cert} with --tls-key {key}: not a PEM certificate and its matching private key ({error.reason or error})"
        ) from None


def _load_ca(context: ssl.SSLContext, ca: Path) -> None:
    _check_readable(ca, "--tls-ca")
    try:
        context.load_verify_locations(cafile=str(ca))
    except ssl.SSLError as error:
        raise LungdetError(f"--tls-ca {ca}: not a PEM CA bundle ({error.reason or error})") from None


def server_context(
    cert: Path, key: Path, *, ca: Path | None = None, require_client_cert: bool = False
) -> ssl.SSLContext:
    """A context for a listening end: this end's ``cert`` and ``key``; with ``require_client_cert``, peers must show a certificate ``ca`` signed."""
    if require_client_cert and ca is None:
        raise LungdetError(
            "--tls-require-client-cert needs --tls-ca, the CA bundle that signs the senders' certificates"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSION
    _load_chain(context, cert, key)
    if ca is not None:
        _load_ca(context, ca)
    context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return context


def client_context(ca: Path, *, cert: Path | None = None, key: Path | None = None) -> ssl.SSLContext:
    """A context for a calling end: the peer's certificate checked against ``ca``, host name included; ``cert`` and ``key`` shown when given."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname by default
    context.minimum_version = MINIMUM_VERSION
    _load_ca(context, ca)
    if cert is not None and key is not None:
        _load_chain(context, cert, key)
    return context
