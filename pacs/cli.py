"""``lungdet pacs``: run a DICOM node, either polling a DICOMweb server (:mod:`lungdet.pacs.node`) or listening for C-STORE (:mod:`lungdet.pacs.dimse`).

Run: ``lungdet pacs --url http://127.0.0.1:8042/dicom-web --checkpoint runs/r50/best.pt [--poll-seconds 10] [--once]``
or ``lungdet pacs --listen LUNGDET@0.0.0.0:11112 --allow ORTHANC --send-to ORTHANC@127.0.0.1:4242 --checkpoint runs/r50/best.pt``
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from lungdet.cli_types import device_name, fraction, int_in_range, positive_seconds
from lungdet.data_tools.gate import ALLOW_ANY_VIEW_WARNING, add_allow_any_view_argument
from lungdet.detection.config import AMP_MODES
from lungdet.errors import LungdetError
from lungdet.pacs.addresses import AEAddress, ae_address, ae_title, allowed_caller, host_port, listen_address
from lungdet.pacs.audit import AuditTrail
from lungdet.pacs.inbox import DEFAULT_KEEP_DAYS, DEFAULT_MAX_INBOX, DimseState
from lungdet.tls import check_key_file, client_context, server_context

TOKEN_VARIABLE = "LUNGDET_PACS_TOKEN"
PASSWORD_VARIABLE = "LUNGDET_PACS_PASSWORD"
# Defaults of the options that belong to one mode; given as None by the parser, so that main can tell "given" from "default".
POLL_DEFAULTS = {"poll_seconds": 10.0, "retry_seconds": 60.0}


def get_args_parser() -> argparse.ArgumentParser:
    """Arguments of ``lungdet pacs``."""
    parser = argparse.ArgumentParser(
        prog="lungdet pacs",
        description="A DICOM node, in one of two modes. With --url it polls a DICOMweb server: finds new chest X-rays (CR, DX; QIDO-RS), "
        "fetches them (WADO-RS), runs the detector, and stores a DICOM Structured Report of the boxes (and with --overlay an annotated "
        "image, with --gsps a presentation state) into each image's study (STOW-RS). With --listen it is a C-STORE node (a Storage SCP that archives and routers send to): "
        "each acknowledged image's results go to --send-to by C-STORE, or to --dicomweb-url by STOW-RS. Either way an image is processed "
        "once, and results the receiver cannot take wait on disk until it can. Research use only: not a diagnostic device.",
        epilog="examples:\n"
        "  lungdet pacs --url http://127.0.0.1:8042/dicom-web --checkpoint runs/r50/best.pt --once\n"
        "  LUNGDET_PACS_PASSWORD=secret lungdet pacs --url https://pacs.example/dicom-web --username lungdet --checkpoint r50.onnx --overlay\n"
        "  lungdet pacs --listen LUNGDET@0.0.0.0:11112 --allow ORTHANC@10.0.0.5 --send-to ORTHANC@10.0.0.5:4242 --checkpoint runs/r50/best.pt --overlay\n"
        "  lungdet pacs --listen LUNGDET@0.0.0.0:2762 --allow ORTHANC --send-to ORTHANC@10.0.0.5:2762 --checkpoint r50.onnx --tls-cert lungdet.crt "
        "--tls-key lungdet.key --tls-ca hospital-ca.pem --tls-require-client-cert --send-tls --audit audit.log",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_mode_arguments(parser)
    _add_polling_arguments(parser)
    _add_listening_arguments(parser)
    _add_result_arguments(parser)
    _add_connection_arguments(parser)
    _add_security_arguments(parser)
    _add_device_arguments(parser)
    return parser


def _add_mode_arguments(parser: argparse.ArgumentParser) -> None:
    """The mode, ``--url`` (polling DICOMweb) or ``--listen`` (C-STORE), and the model (``--checkpoint``)."""
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--url", help="poll this DICOMweb root, e.g. http://127.0.0.1:8042/dicom-web (Orthanc)")
    mode.add_argument(
        "--listen",
        type=listen_address,
        metavar="AE@HOST:PORT",
        help="listen for C-STORE as AE on HOST:PORT, e.g. LUNGDET@0.0.0.0:11112 (HOST:PORT alone answers as --ae-title; port 0 picks a free one)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a checkpoint from lungdet train, or an export from lungdet export",
    )


def _add_polling_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--url``: how often to poll, once, and how long to retry."""
    poll = parser.add_argument_group("with --url (DICOMweb polling)")
    poll.add_argument("--poll-seconds", type=positive_seconds, default=None, help="pause between polls (default 10)")
    poll.add_argument(
        "--once", action="store_true", help="one poll, then stop (exit status 1 if results are left waiting on disk)"
    )
    poll.add_argument(
        "--retry-seconds",
        type=positive_seconds,
        default=None,
        help="with --once: how long to keep retrying a server that does not answer before giving up (default 60)",
    )


def _add_listening_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``--listen``: where results go, who may send, the inbox bound and the AE title."""
    listen = parser.add_argument_group("with --listen (C-STORE)")
    listen.add_argument(
        "--send-to",
        type=ae_address,
        metavar="AE@HOST:PORT",
        help="store results by C-STORE into this node, e.g. ORTHANC@127.0.0.1:4242",
    )
    listen.add_argument(
        "--dicomweb-url",
        metavar="URL",
        help="or store them by STOW-RS into this DICOMweb root (--username/--token apply)",
    )
    listen.add_argument(
        "--allow",
        type=allowed_caller,
        action="append",
        metavar="AE[@HOST]",
        help="a calling AE title that may send, from any host or from HOST only (repeat for each sender); others are rejected at association",
    )
    listen.add_argument(
        "--allow-any", action="store_true", help="accept any calling AE title (a closed test network only)"
    )
    listen.add_argument(
        "--max-inbox",
        type=int_in_range(1),
        default=None,
        help=f"images acknowledged and not yet processed, at most; beyond, senders get 0xA700 (out of resources) and send again later (default {DEFAULT_MAX_INBOX})",
    )
    listen.add_argument(
        "--ae-title",
        type=ae_title,
        default="LUNGDET",
        help="this node's AE title when it stores results, and to listen as when --listen has none (default LUNGDET)",
    )


def _add_result_arguments(parser: argparse.ArgumentParser) -> None:
    """What is stored besides the report, where the node keeps its state, and the box cut-off."""
    parser.add_argument(
        "--overlay", action="store_true", help="also store a Secondary Capture of each X-ray with its boxes burnt in"
    )
    parser.add_argument(
        "--gsps",
        action="store_true",
        help="also store a Grayscale Softcopy Presentation State, which GSPS-capable viewers draw over the original X-ray as a switchable layer",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path("lungdet-pacs-state"),
        help="where the node remembers its work and keeps unsent results (default ./lungdet-pacs-state)",
    )
    parser.add_argument(
        "--score-threshold", type=fraction, default=None, help="box cut-off (default: the checkpoint's tuned one)"
    )


def _add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Authentication and the timeout of each request."""
    auth = parser.add_argument_group("authentication (basic or bearer)")
    auth.add_argument(
        "--username",
        help=f"basic authentication; the password comes from ${PASSWORD_VARIABLE} (not the command line, which others can read)",
    )
    auth.add_argument("--token", help=f"a bearer token (or set ${TOKEN_VARIABLE})")
    parser.add_argument(
        "--timeout", type=positive_seconds, default=30.0, help="seconds to wait for each request (default 30)"
    )


def _add_security_arguments(parser: argparse.ArgumentParser) -> None:
    """DICOM TLS, the audit trail, how long the node remembers, and the frontal-chest gate (docs/dicom_and_pacs.md, Security)."""
    tls = parser.add_argument_group("DICOM TLS (with --listen; with --url, the HTTPS of the DICOMweb server)")
    tls.add_argument(
        "--tls-cert", type=Path, metavar="CERT", help="this node's PEM certificate; --listen then accepts TLS only"
    )
    tls.add_argument("--tls-key", type=Path, metavar="KEY", help="its PEM private key, readable by this account only")
    tls.add_argument(
        "--tls-ca", type=Path, metavar="CA", help="the PEM CA bundle this node trusts for its peers, both ways"
    )
    tls.add_argument(
        "--tls-require-client-cert",
        action="store_true",
        help="senders must show a client certificate that --tls-ca signed",
    )
    tls.add_argument(
        "--send-tls",
        action="store_true",
        help="store results to --send-to over TLS: its certificate checked against --tls-ca (host name included), "
        "this node's --tls-cert shown",
    )
    audit = parser.add_argument_group("audit trail (DICOM PS3.15 A.5 audit messages)")
    audit.add_argument(
        "--audit", type=Path, metavar="FILE", help="append one audit message per line to FILE (created 0600)"
    )
    audit.add_argument(
        "--audit-syslog",
        type=host_port,
        metavar="HOST:PORT",
        help="send each audit message to this syslog collector (RFC 5424 over TCP)",
    )
    audit.add_argument(
        "--audit-syslog-tls",
        action="store_true",
        help="speak TLS to --audit-syslog (RFC 5425), checking its certificate against --tls-ca",
    )
    parser.add_argument(
        "--keep-days",
        type=positive_seconds,
        default=None,
        metavar="DAYS",
        help=f"with --listen: forget settled images after this many days (an image sent again later is analysed "
        f"again, its result the same instances; default {DEFAULT_KEEP_DAYS:g})",
    )
    add_allow_any_view_argument(parser)


def _add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Where and at which precision the model runs."""
    parser.add_argument(
        "--device", type=device_name, default="auto", help="'auto' (CUDA if available), 'cpu' or 'cuda:N'"
    )
    parser.add_argument(
        "--amp",
        choices=AMP_MODES,
        default="auto",
        help="mixed precision for a checkpoint, as lungdet predict's --amp (default auto)",
    )


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
    if args.tls_ca is not None:  # an HTTPS server whose certificate the hospital's CA signed
        session.verify = str(args.tls_ca)
    if args.tls_cert is not None:  # and a client certificate, where the server asks for one
        check_key_file(args.tls_key)
        session.cert = (str(args.tls_cert), str(args.tls_key))
    client = DICOMwebClient(args.url.rstrip("/"), session=session, timeout=args.timeout)
    # dicomweb-client retries every failed request itself, for about 30 s (exponential waits); the
    # node has its own retry loop, which says once that the server is down, so each request is tried once.
    client.set_http_retry_params(retry=False)
    return client


LISTEN_ONLY = (
    "send_to",
    "dicomweb_url",
    "allow",
    "allow_any",
    "max_inbox",
    "keep_days",
    "tls_require_client_cert",
    "send_tls",
)
POLL_ONLY = ("poll_seconds", "once", "retry_seconds")


def check_mode(args: argparse.Namespace) -> None:
    """Refuse, before any work, options that do not belong to the chosen mode or contradict each other (a one-line LungdetError)."""

    def given(names: tuple[str, ...]) -> list[str]:
        return ["--" + name.replace("_", "-") for name in names if getattr(args, name, None) not in (None, False)]

    if args.url is not None:
        if given(LISTEN_ONLY):
            raise LungdetError(
                f"{', '.join(given(LISTEN_ONLY))}: only with --listen (the C-STORE node); --url polls a DICOMweb server"
            )
        check_tls(args)
        return
    if given(POLL_ONLY):
        raise LungdetError(
            f"{', '.join(given(POLL_ONLY))}: only with --url (DICOMweb polling); the --listen node runs until stopped"
        )
    if (args.send_to is None) == (args.dicomweb_url is None):
        raise LungdetError(
            "--listen needs one place for the results: --send-to AE@HOST:PORT (C-STORE) or --dicomweb-url URL (STOW-RS)"
        )
    if args.allow and args.allow_any:
        raise LungdetError("give --allow AE[@HOST] for each sender, or --allow-any, not both")
    if not args.allow and not args.allow_any:
        raise LungdetError(
            "--listen needs --allow AE[@HOST] for each sender (an archive's or router's AE title), or --allow-any on a closed test network"
        )
    check_tls(args)


def check_tls(args: argparse.Namespace) -> None:
    """Refuse TLS and audit options that cannot work together (a one-line LungdetError); the files themselves are read later."""
    if (args.tls_cert is None) != (args.tls_key is None):
        raise LungdetError(
            "give --tls-cert CERT and --tls-key KEY together: this node's certificate and its private key"
        )
    if args.tls_require_client_cert and (args.tls_cert is None or args.tls_ca is None):
        raise LungdetError(
            "--tls-require-client-cert needs --tls-cert/--tls-key (TLS on) and --tls-ca (the CA that signs the senders)"
        )
    if args.send_tls and (args.send_to is None or args.tls_ca is None):
        raise LungdetError("--send-tls needs --send-to AE@HOST:PORT and --tls-ca (the CA that signed the receiver)")
    if args.audit_syslog_tls and (args.audit_syslog is None or args.tls_ca is None):
        raise LungdetError(
            "--audit-syslog-tls needs --audit-syslog HOST:PORT and --tls-ca (the CA that signed the collector)"
        )


def audit_trail(args: argparse.Namespace) -> AuditTrail | None:
    """The trail of ``--audit`` and ``--audit-syslog`` (None with neither); the file is opened, and checked, here."""
    if args.audit is None and args.audit_syslog is None:
        return None
    return AuditTrail(
        file=args.audit,
        syslog=args.audit_syslog,
        syslog_tls=client_context(args.tls_ca) if args.audit_syslog_tls else None,
        say=logging.getLogger("lungdet.pacs").info,
    )


def setup_logging() -> logging.Logger:
    """Send the ``lungdet.pacs`` log, INFO and up, to stderr with a timestamp (one handler); returns that logger."""
    # The node's own lines only: dicomweb-client, highdicom and pynetdicom log every request, copied module and PDU.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s lungdet pacs: %(message)s"))
    node_log = logging.getLogger("lungdet.pacs")
    node_log.handlers = [handler]  # one handler, to this process's stderr, however often main runs
    node_log.setLevel(logging.INFO)
    node_log.propagate = False
    return node_log


def main(args: argparse.Namespace) -> int:
    """Run ``lungdet pacs`` with parsed arguments; returns the exit status (0 on success).

    Options are checked against the mode before any work; ``--listen`` goes on in :func:`main_listen`. Polling returns 1
    when ``--once`` leaves results waiting on disk or the server never answers, and 130 on Ctrl-C.
    """
    check_mode(args)
    try:
        from lungdet.pacs.node import NodeState, PacsNode
        from lungdet.show.dicom_derived import model_identity
    except ImportError as error:
        raise LungdetError(f"lungdet pacs needs the dicom extra ({error}); pip install 'lungdet[dicom]'") from None
    if args.listen is not None:
        return main_listen(args)
    from lungdet import lungdet_version
    from lungdet.detection.detector import load_detector

    setup_logging()
    if args.allow_any_view:
        print(ALLOW_ANY_VIEW_WARNING, file=sys.stderr)
    client = make_client(args)
    detector = load_detector(args.checkpoint, device=args.device, amp=args.amp)
    cut_off = detector.score_threshold if args.score_threshold is None else args.score_threshold
    model = model_identity(lungdet_version(), [detector.architecture], [detector.checkpoint_sha256], cut_off)
    state = NodeState.load(args.state_dir)
    node = PacsNode(
        client,
        detector,
        model,
        state,
        cut_off=cut_off,
        overlay=args.overlay,
        gsps=args.gsps,
        gate=not args.allow_any_view,
        audit=audit_trail(args),
    )
    node.say(
        f"{args.url}: {detector.architecture} ({detector.format}) on {detector.device}, cut-off {cut_off:g}; state in {args.state_dir}; "
        "research use only, not a diagnostic device"
    )
    poll_seconds = args.poll_seconds or POLL_DEFAULTS["poll_seconds"]
    retry_seconds = args.retry_seconds or POLL_DEFAULTS["retry_seconds"]
    try:
        return node.run(poll_seconds=poll_seconds, once=args.once, retry_seconds=retry_seconds)
    except KeyboardInterrupt:
        node.say(
            f"stopped; {sum(1 for _ in state.pending())} result(s) waiting in {state.pending_folder} are stored by the next run"
        )
        return 130
    finally:
        if node.audited.trail is not None:
            node.audited.trail.close()


def main_listen(args: argparse.Namespace) -> int:
    """``--listen``: the C-STORE node of :mod:`lungdet.pacs.dimse`, until SIGINT or SIGTERM."""
    import signal

    try:
        from lungdet.pacs.dimse import DimseNode
        from lungdet.pacs.receivers import CStoreReceiver, DicomwebReceiver
    except ImportError as error:
        raise LungdetError(
            f"lungdet pacs --listen needs the dicom extra ({error}); pip install 'lungdet[dicom]'"
        ) from None
    from lungdet import lungdet_version
    from lungdet.detection.detector import load_detector
    from lungdet.show.dicom_derived import model_identity

    title, host, port = args.listen
    listen = AEAddress(title or args.ae_title, host, port)
    # Every certificate and key is read before the model loads: a wrong file fails in a second.
    listen_tls = (
        None
        if args.tls_cert is None
        else server_context(
            args.tls_cert, args.tls_key, ca=args.tls_ca, require_client_cert=args.tls_require_client_cert
        )
    )
    send_tls = client_context(args.tls_ca, cert=args.tls_cert, key=args.tls_key) if args.send_tls else None
    if args.send_to is not None:
        receiver = CStoreReceiver(args.send_to, ae_title=args.ae_title, timeout=args.timeout, tls=send_tls)
    else:
        receiver = DicomwebReceiver(
            make_client(argparse.Namespace(**{**vars(args), "url": args.dicomweb_url})), args.dicomweb_url
        )
    log = setup_logging()
    if args.allow_any_view:
        log.info(ALLOW_ANY_VIEW_WARNING)
    audit = audit_trail(args)
    detector = load_detector(args.checkpoint, device=args.device, amp=args.amp)
    cut_off = detector.score_threshold if args.score_threshold is None else args.score_threshold
    model = model_identity(lungdet_version(), [detector.architecture], [detector.checkpoint_sha256], cut_off)
    state = DimseState.open(
        args.state_dir,
        max_inbox=args.max_inbox or DEFAULT_MAX_INBOX,
        keep_days=args.keep_days or DEFAULT_KEEP_DAYS,
    )
    try:
        node = DimseNode(
            listen,
            state,
            detector,
            model,
            receiver,
            None if args.allow_any else args.allow,
            cut_off,
            overlay=args.overlay,
            gsps=args.gsps,
            gate=not args.allow_any_view,
            tls=listen_tls,
            audit=audit,
            say=log.info,
        )
    except ValueError as error:  # an --allow host that does not resolve
        raise LungdetError(str(error)) from None
    # A service stop (SIGTERM) ends the node as Ctrl-C does; kill -9 is safe too (see lungdet.pacs.dimse).
    previous = signal.signal(signal.SIGTERM, lambda number, frame: node.stopping.set())
    try:
        node.start()
        node.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
        signal.signal(signal.SIGTERM, previous)  # main may run inside a longer-lived process (the tests)
        if audit is not None:
            audit.close()
    node.say(
        f"stopped; {state.inbox_count()} instance(s) in {state.inbox_folder} and {len(state.pending())} result(s) in {state.pending_folder} "
        "are handled by the next run"
    )
    return 0
