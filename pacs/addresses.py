"""DICOM network addresses as ``lungdet pacs`` takes them on its command line: ``AE@HOST:PORT`` and ``AE[@HOST]``.

Kept apart from :mod:`lungdet.pacs.dimse` (which needs pynetdicom) so that the command's parser,
and the docs test that runs it, work without the network libraries. Each parser raises
``argparse.ArgumentTypeError`` with what was expected, an example and what was given; argparse
puts the flag in front.
"""

from __future__ import annotations

import argparse
import ipaddress
import socket
from dataclasses import dataclass

# PS3.5 6.2: an AE title is 1 to 16 characters of the default repertoire, without backslash or
# control characters; leading and trailing spaces are not significant.
AE_TITLE_MAX = 16


@dataclass(frozen=True)
class AEAddress:
    """An application entity on the network: its AE title, host (a name or an IP address) and TCP port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # an IPv6 address keeps its port apart
        return f"{self.ae_title}@{host}:{self.port}"


@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE title that may associate, from any host (``host`` None) or from one host only."""

    ae_title: str
    host: str | None = None

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"

    def addresses(self) -> frozenset[str]:
        """The IP addresses ``host`` stands for (a name is looked up once, at start-up); empty for any host.

        Raises ``ValueError`` naming the host when it cannot be resolved.
        """
        if self.host is None:
            return frozenset()
        try:
            found = {str(ipaddress.ip_address(self.host))}
        except ValueError:  # a name, not an address
            try:
                found = {str(info[4][0]) for info in socket.getaddrinfo(self.host, None, proto=socket.IPPROTO_TCP)}
            except socket.gaierror as error:
                raise ValueError(
                    f"--allow {self}: host {self.host!r} cannot be resolved ({error.strerror}); give its IP address"
                ) from None
        # An IPv4 peer on a dual-stack socket shows as ::ffff:a.b.c.d; both spellings are allowed.
        return frozenset(found | {f"::ffff:{address}" for address in found if "." in address})


def ae_title(text: str) -> str:
    """An AE title: 1-16 characters, no backslash or control characters (surrounding spaces dropped)."""
    title = text.strip(" ")
    if not title:
        raise argparse.ArgumentTypeError(
            f"expected an AE title of 1 to {AE_TITLE_MAX} characters, e.g. LUNGDET, got {text!r}"
        )
    if len(title) > AE_TITLE_MAX:
        raise argparse.ArgumentTypeError(
            f"AE title {title!r} has {len(title)} characters; DICOM allows at most {AE_TITLE_MAX}"
        )
    if "\\" in title or any(ord(character) < 32 or ord(character) > 126 for character in title):
        raise argparse.ArgumentTypeError(
            f"AE title {title!r} may hold only printable ASCII characters other than backslash"
        )
    return title


def _host_and_port(text: str, whole: str, example: str) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6]:PORT
        host, bracket, rest = text[1:].partition("]")
        port_text = rest[1:] if bracket and rest.startswith(":") else ""
    else:
        host, _, port_text = text.rpartition(":")
    if not host or not port_text:
        raise argparse.ArgumentTypeError(f"expected {example}, got {whole!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"port {port_text!r} in {whole!r} is not a number; expected {example}"
        ) from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(
            f"port {port} in {whole!r} is out of range; TCP ports are 1 to 65535 (104 and 11112 are DICOM's)"
        )
    return host, port


def ae_address(text: str) -> AEAddress:
    """``AE@HOST:PORT`` (``HOST`` a name, an IPv4 address or ``[IPv6]``) -> :class:`AEAddress`."""
    example = "AE@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242"
    title, at, rest = text.rpartition("@")
    if not at:
        raise argparse.ArgumentTypeError(f"expected {example}; {text!r} has no '@' between the AE title and the host")
    host, port = _host_and_port(rest, text, example)
    if port == 0:
        raise argparse.ArgumentTypeError(
            f"port 0 in {text!r}: give the port the other node listens on (104 and 11112 are DICOM's)"
        )
    return AEAddress(ae_title(title), host, port)


def listen_address(text: str) -> tuple[str | None, str, int]:
    """``[AE@]HOST:PORT`` to listen on -> (AE title or None for --ae-title's, host, port); port 0 picks a free one."""
    example = "AE@HOST:PORT, e.g. LUNGDET@0.0.0.0:11112"
    title, at, rest = text.rpartition("@")
    host, port = _host_and_port(rest, text, example)
    return (ae_title(title) if at else None), host, port


def host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (a syslog collector, say) -> (host, port); port 0 is refused."""
    example = "HOST:PORT, e.g. 127.0.0.1:6514"
    host, port = _host_and_port(text, text, example)
    if port == 0:
        raise argparse.ArgumentTypeError(f"port 0 in {text!r}: give the port the collector listens on")
    return host.strip("[]"), port


def allowed_caller(text: str) -> AllowedCaller:
    """``AE`` or ``AE@HOST`` -> :class:`AllowedCaller`."""
    title, at, host = text.rpartition("@")
    if not at:
        return AllowedCaller(ae_title(text))
    if not host:
        raise argparse.ArgumentTypeError(f"expected AE or AE@HOST, e.g. ORTHANC@10.0.0.5, got {text!r}")
    return AllowedCaller(ae_title(title), host.strip("[]"))
