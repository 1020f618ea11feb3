"""``lungdet pacs``: run the DICOM node of :mod:`lungdet.pacs.node` against a DICOMweb server.

Run: ``lungdet pacs --url http://127.0.0.1:8042/dicom-web --checkpoint runs/r50/best.pt [--poll-seconds 10] [--once]``
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lungdet.cli_types import fraction, positive_seconds
from lungdet.errors import LungdetError

TOKEN_VARIABLE = "LUNGDET_PACS_TOKEN"
PASSWORD_VARIABLE = "LUNGDET_PACS_PASSWORD"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lungdet pacs",
        description="A DICOM node: find new chest X-rays (CR, DX) on a DICOMweb server (QIDO-RS), fetch them (WADO-RS), run the "
        "detector, and store a DICOM Structured Report of the boxes (and with --overlay an annotated image) into each image's study "
        "(STOW-RS). An image that already has this model's report is never processed again; results the server cannot take wait on "
        "disk and are stored on the next poll. Research use only: not a diagnostic device.",
        epilog="examples:\n"
        "  lungdet pacs --url http://127.0.0.1:8042/dicom-web --checkpoint runs/r50/best.pt --once\n"
        "  LUNGDET_PACS_PASSWORD=secret lungdet pacs --url https://pacs.example/dicom-web --username lungdet --checkpoint r50.onnx --overlay",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--url", required=True, help="the server's DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web (Orthanc)")
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint from lungdet train, or an export from lungdet export")
    parser.add_argument("--poll-seconds", type=positive_seconds, default=10.0, help="pause between polls (default 10)")
    parser.add_argument("--once", action="store_true", help="one poll, then stop (exit status 1 if results are left waiting on disk)")
    parser.add_argument(
        "--retry-seconds", type=positive_seconds, default=60.0,
        help="with --once: how long to keep retrying a server that does not answer before giving up (default 60)",
    )
    parser.add_argument("--overlay", action="store_true", help="also store a Secondary Capture of each X-ray with its boxes burnt in")
    parser.add_argument("--state-dir", type=Path, default=Path("lungdet-pacs-state"), help="where the node remembers its work and keeps unsent results (default ./lungdet-pacs-state)")
    parser.add_argument("--score-threshold", type=fraction, default=None, help="box cut-off (default: the checkpoint's tuned one)")
    auth = parser.add_argument_group("authentication (basic or bearer)")
    auth.add_argument("--username", help=f"basic authentication; the password comes from ${PASSWORD_VARIABLE} (not the command line, which others can read)")
    auth.add_argument("--token", help=f"a bearer token (or set ${TOKEN_VARIABLE})")
    parser.add_argument("--timeout", type=positive_seconds, default=30.0, help="seconds to wait for each request (default 30)")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda:N'")
    parser.add_argument("--amp", default="auto", help="mixed precision for a checkpoint, as lungdet predict's --amp")
    return parser


def make_client(args: argparse.Namespace):
    """A dicomweb-client for ``args.url`` with the requested authentication."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    token = args.token or os.environ.get(TOKEN_VARIABLE)
    if args.username and token:
        raise LungdetError("give --username (basic) or a token (bearer), not both")
    if args.username:
        password = os.environ.get(PASSWORD_VARIABLE)
        if password is None:
            raise LungdetError(f"--username {args.username}: set the password in ${PASSWORD_VARIABLE}")
        session.auth = (args.username, password)
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    client = DICOMwebClient(args.url.rstrip("/"), session=session, timeout=args.timeout)
    # dicomweb-client retries every failed request itself, for about 30 s (exponential waits); the
    # node has its own retry loop, which says once that the server is down, so each request is tried once.
    client.set_http_retry_params(retry=False)
    return client


def main(args: argparse.Namespace) -> int:
    try:
        from lungdet.show.dicom_results import model_identity
        from lungdet.pacs.node import NodeState, PacsNode
    except ImportError as error:
        raise LungdetError(f"lungdet pacs needs the dicom extra ({error}); pip install 'lungdet[dicom]'") from None
    from lungdet import lungdet_version
    from lungdet.detection.detector import load_detector

    # The node's own lines only: dicomweb-client and highdicom log every request and copied module at INFO.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s lungdet pacs: %(message)s"))
    node_log = logging.getLogger("lungdet.pacs")
    node_log.handlers = [handler]  # one handler, to this process's stderr, however often main runs
    node_log.setLevel(logging.INFO)
    node_log.propagate = False
    client = make_client(args)
    detector = load_detector(args.checkpoint, device=args.device, amp=args.amp)
    cut_off = detector.score_threshold if args.score_threshold is None else args.score_threshold
    model = model_identity(lungdet_version(), [detector.architecture], [detector.checkpoint_sha256], cut_off)
    state = NodeState.load(args.state_dir)
    node = PacsNode(client, detector, model, state, cut_off=cut_off, overlay=args.overlay)
    node.say(
        f"{args.url}: {detector.architecture} ({detector.format}) on {detector.device}, cut-off {cut_off:g}; state in {args.state_dir}; "
        "research use only, not a diagnostic device"
    )
    try:
        return node.run(poll_seconds=args.poll_seconds, once=args.once, retry_seconds=args.retry_seconds)
    except KeyboardInterrupt:
        node.say(f"stopped; {sum(1 for _ in state.pending())} result(s) waiting in {state.pending_folder} are stored by the next run")
        return 130
