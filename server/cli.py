"""``lungdet serve``: load a checkpoint (or an ONNX/TorchScript export) once and serve the page and the JSON API with uvicorn.

Run: ``lungdet serve --checkpoint demo_output/run/best.pt`` then open the URL it prints.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import ssl
import sys
import warnings
from pathlib import Path

from lungdet.cli_types import device_name, int_in_range
from lungdet.data_tools.gate import ALLOW_ANY_VIEW_WARNING, add_allow_any_view_argument
from lungdet.data_tools.image_io import DEFAULT_MAX_PIXELS
from lungdet.detection.config import AMP_MODES
from lungdet.errors import LungdetError
from lungdet.server.batcher import DEFAULT_MAX_BATCH
from lungdet.tls import server_context

TOKEN_VARIABLE = "LUNGDET_API_TOKEN"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``lungdet serve``."""
    parser = argparse.ArgumentParser(
        prog="lungdet serve",
        description="Serve a web page and a JSON API (POST /api/v1/detect) that find lung-opacity boxes on one chest X-ray "
        "at a time: DICOM, PNG or JPEG. A research tool, not a diagnostic device.",
        epilog="example: lungdet serve --checkpoint demo_output/run/best.pt   (then open http://127.0.0.1:8000/)\n"
        "         curl -F file=@xray.dcm http://127.0.0.1:8000/api/v1/detect",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a checkpoint from lungdet train (RUN/best.pt), or an export from lungdet export (model.onnx, model.ts)",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every network)",
    )
    parser.add_argument(
        "--port", type=int_in_range(0, 65535), default=8000, help="port (default 8000; 0 picks a free one)"
    )
    parser.add_argument(
        "--device", type=device_name, default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda:N'"
    )
    parser.add_argument(
        "--amp", choices=AMP_MODES, default="auto", help="mixed precision, as lungdet predict's --amp (default auto)"
    )
    parser.add_argument(
        "--max-upload-mb",
        type=int_in_range(1, 4096),
        default=64,
        help="refuse a request body over this many MiB with 413, while it streams in (default 64)",
    )
    parser.add_argument(
        "--max-megapixels",
        type=int_in_range(1, 1000),
        default=DEFAULT_MAX_PIXELS // 1_000_000,
        help=f"refuse an image declaring more pixels than this in its header, before decoding it (default {DEFAULT_MAX_PIXELS // 1_000_000})",
    )
    parser.add_argument(
        "--max-batch",
        type=int_in_range(1, 256),
        default=DEFAULT_MAX_BATCH,
        help=f"at most this many concurrent requests' images go through the model together (default {DEFAULT_MAX_BATCH}; 1 = one at a time)",
    )
    parser.add_argument(
        "--api-token",
        default=None,
        help=f"require 'Authorization: Bearer TOKEN' on every API request; default: ${TOKEN_VARIABLE}, which stays out of the process list",
    )
    parser.add_argument(
        "--tls-cert", type=Path, metavar="CERT", help="serve HTTPS with this PEM certificate (and --tls-key)"
    )
    parser.add_argument(
        "--tls-key", type=Path, metavar="KEY", help="the certificate's PEM private key, readable by this account only"
    )
    add_allow_any_view_argument(parser)
    return parser


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP address; any other host name counts as not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready socket on ``host:port``, bound here so that port 0 can be reported and a busy port refused with a clear message."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted connections only when the
    # listening socket says TCP. Without it a kept-alive connection (every browser's) waited 40 ms per
    # reply, the response's head and body held back by Nagle's algorithm until the client's delayed ACK.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise LungdetError(
            f"cannot listen on {host}:{port} ({error.strerror or error}); pick another port with --port (0 for any free one) or check --host"
        ) from None
    return sock


def page_url(host: str, port: int, *, https: bool = False) -> str:
    """The address to print for the page: a wildcard host (``0.0.0.0``, ``::``) shown as loopback, IPv6 in brackets."""
    shown = (
        "127.0.0.1" if host in ("0.0.0.0", "") else "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    )
    return f"{'https' if https else 'http'}://{shown}:{port}/"


def https_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The HTTPS context of ``--tls-cert`` and ``--tls-key`` (TLS 1.2 at least), None for plain HTTP; one flag without the other is refused."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise LungdetError("HTTPS needs both --tls-cert CERT and --tls-key KEY")
    if args.tls_cert is None:
        return None
    return server_context(args.tls_cert, args.tls_key)


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet serve`` with parsed arguments until the server stops; returns the exit status (0 on success).

    The port is bound before the model loads, so a busy port fails at once; listening beyond loopback without a
    token (``--api-token`` or ``$LUNGDET_API_TOKEN``) prints a warning on stderr.
    """
    try:
        import uvicorn

        from lungdet.server.app import create_app
    except ImportError as error:
        raise LungdetError(
            f"lungdet serve needs FastAPI and uvicorn, which are not installed ({error.name} is missing); "
            "install them with: pip install 'lungdet[serve]'"
        ) from None
    from lungdet.detection.detector import load_detector

    token = args.api_token or os.environ.get(TOKEN_VARIABLE) or None
    tls = https_context(args)  # before the port and the model: a wrong key file fails in a second
    if args.allow_any_view:
        print(f"lungdet serve: {ALLOW_ANY_VIEW_WARNING}", file=sys.stderr, flush=True)
    if not is_loopback(args.host) and token is None:
        print(
            f"lungdet serve: warning: listening on {args.host} without --api-token: anyone on the network can use this server",
            file=sys.stderr,
            flush=True,
        )
    # Bound before the model loads, so a busy port fails in a second rather than after the load.
    sock = bind_socket(args.host, args.port)
    try:
        detector = load_detector(args.checkpoint, device=args.device, amp=args.amp)
    except BaseException:
        sock.close()
        raise
    app = create_app(
        detector,
        max_upload_bytes=args.max_upload_mb * 2**20,
        api_token=token,
        max_pixels=args.max_megapixels * 1_000_000,
        max_batch=args.max_batch,
        gate=not args.allow_any_view,
    )
    url = page_url(args.host, sock.getsockname()[1], https=tls is not None)
    print(f"lungdet serve: open {url}   (API: POST {url}api/v1/detect, docs: {url}docs)", flush=True)
    print(
        f"  model {detector.architecture}{'' if detector.format == 'checkpoint' else f' ({detector.format} export)'} at {detector.image_size} px on {detector.device} ({detector.precision_name}), "
        f"cut-off {detector.score_threshold:g}; uploads up to {args.max_upload_mb} MiB; {'token required' if token else 'no token'}",
        flush=True,
    )
    print("  lungdet is a research tool, not a diagnostic device. Ctrl-C stops the server.", flush=True)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    quiet_value_warnings()
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=True,
        timeout_graceful_shutdown=5,
        # uvicorn's own option for a ready context: lungdet's (TLS 1.2 at least, the key's permissions checked).
        ssl_context_factory=None if tls is None else (lambda config, default: tls),
    )
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def quiet_value_warnings() -> None:
    """Keep pydicom's warnings out of the log: some quote a tag's value, and an upload's tags may identify a patient.

    dicom_io turns the warnings it needs (a file cut short) into errors inside its own
    ``catch_warnings``, which takes precedence over these filters.
    """
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")
    logging.getLogger("pydicom").setLevel(logging.ERROR)
