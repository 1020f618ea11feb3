"""Certificates for the TLS tests, made with the openssl command in a temporary folder: never committed.

:func:`make_pki` makes a CA, and under it one certificate (and 0600 key) per name, each valid for
127.0.0.1 and localhost, for server and client use alike, as a hospital's CA would issue to a DICOM
node. A second call with another folder is a second, unrelated CA: a certificate from it is one the
first CA's peers must refuse.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

EXTENSIONS = """[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
"""


@dataclass(frozen=True)
class Pki:
    """A CA (``ca``: its PEM certificate) and, per name, ``(certificate, key)`` paths."""

    ca: Path
    pairs: dict[str, tuple[Path, Path]]

    def cert(self, name: str) -> Path:
        return self.pairs[name][0]

    def key(self, name: str) -> Path:
        return self.pairs[name][1]


def _openssl(*arguments: str, folder: Path) -> None:
    subprocess.run(["openssl", *arguments], cwd=folder, check=True, capture_output=True, timeout=60)


def make_pki(folder: Path, names: tuple[str, ...], *, ca_name: str = "lungdet test CA") -> Pki:
    """A CA in ``folder`` and a certificate for each of ``names`` (its common name), RSA 2048, valid two days."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "extensions.cnf").write_text(EXTENSIONS)
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", f"/CN={ca_name}",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        folder=folder,
    )  # fmt: skip
    pairs = {}
    for name in names:
        _openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
            folder=folder,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", "extensions.cnf", "-extensions", "leaf",
            folder=folder,
        )  # fmt: skip
        os.chmod(folder / f"{name}.key", 0o600)
        pairs[name] = (folder / f"{name}.crt", folder / f"{name}.key")
    return Pki(folder / "ca.crt", pairs)


def orthanc_tls_settings(pki: Pki, name: str = "orthanc") -> dict[str, object]:
    """Orthanc's configuration keys for DICOM TLS both ways with ``name``'s certificate, peers' certificates required (as docs/dicom_and_pacs.md gives them)."""
    return {
        "DicomTlsEnabled": True,
        "DicomTlsCertificate": str(pki.cert(name)),
        "DicomTlsPrivateKey": str(pki.key(name)),
        "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    }
