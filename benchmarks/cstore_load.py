"""Load on ``lungdet pacs --listen`` (a benchmark, not a test): concurrent C-STORE senders, results to a real receiver, all on loopback.

Writes ``--instances`` DICOMs (the 13 real RSNA samples again and again, each under fresh Study,
Series and SOP Instance UIDs, the pixel data untouched), starts a receiver (Orthanc with its DICOM
server, or DCMTK's storescp) and ``lungdet pacs --listen`` with results going to it, then sends
everything from ``--clients`` processes at once, each over one association:

- ``--client pynetdicom`` (default): each process times every C-STORE from request to response, so
  the acknowledgement latency is per instance (storescu cannot say when each instance was answered);
- ``--client storescu``: DCMTK's storescu processes, for throughput only.

Then it waits until the receiver holds a result set for every instance and checks there is exactly
one per instance (one report in each instance's own study; with storescp every stored copy is a file
of its own, so a second copy would show). Reported: acknowledgement latency p50/p95/max, instances
acknowledged per second, results stored per second, and from the node's log the time from an
instance's arrival to its result being stored (p50/p95). Exit status 1 if any instance was refused
or has no result, or more than one.

Run: ``.venv/bin/python benchmarks/cstore_load.py [--checkpoint runs/r50/best.pt] [--instances 200] [--clients 4] [--receiver orthanc|storescp] [--client pynetdicom|storescu] [--security plain,tls,tls+audit]``

``--security`` runs the same load once per variant, one after the other, each with a fresh receiver
and node: plain TCP, DICOM TLS both ways (certificates made with openssl, client certificates
required, results sent with --send-tls), and TLS with ``--audit FILE``.
(without ``--checkpoint`` it writes the tests' tiny serving checkpoint, a from-scratch MobileNetV3-FPN at 128 px, and uses that).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import multiprocessing
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = REPO.parent / "shared" / "data" / "rsna_sample" / "stage_2_train_images"
START_TIMEOUT_S = 180
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) lungdet pacs: (.*)$")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(condition, what: str, timeout: float) -> float:
    """Poll ``condition`` every 0.1 s; the wall-clock time (time.time()) it first held. Exits with a message on timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.time()
        time.sleep(0.1)
    raise SystemExit(f"waited {timeout:g} s for {what}")


def write_instances(samples: list[Path], count: int, folder: Path) -> list[tuple[Path, str, str]]:
    """``count`` copies of the samples under fresh UIDs: [(file, SOP Instance UID, Study Instance UID)]."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        dataset = pydicom.dcmread(samples[index % len(samples)])
        dataset.StudyInstanceUID, dataset.SeriesInstanceUID, dataset.SOPInstanceUID = (
            generate_uid(),
            generate_uid(),
            generate_uid(),
        )
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        path = folder / f"{index:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        written.append((path, dataset.SOPInstanceUID, dataset.StudyInstanceUID))
    return written


class OrthancReceiver:
    """Orthanc's DICOM server as the receiver (no plugins); its REST API counts what arrived. With ``pki``, DICOM TLS only."""

    def __init__(self, folder: Path, pki=None) -> None:
        binary = shutil.which("Orthanc")
        if binary is None:
            raise SystemExit("Orthanc is not installed (apt-get install orthanc); or pass --receiver storescp")
        self.http, self.port = free_port(), free_port()
        folder.mkdir(parents=True)
        config = {
            "Name": "cstore-load",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "storage"),
            "HttpPort": self.http,
            "DicomServerEnabled": True,
            "DicomAet": "ORTHANC",
            "DicomPort": self.port,
            "RemoteAccessAllowed": False,
        }
        if pki is not None:  # the keys docs/dicom_and_pacs.md (Security) gives
            from tests.tls_certs import orthanc_tls_settings

            config.update(orthanc_tls_settings(pki))
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "w")
        self.process = subprocess.Popen(
            [binary, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT, cwd=folder
        )
        wait_until(self._answers, "Orthanc to start", 60)
        self.ae_title = "ORTHANC"

    def _get(self, path: str, data: bytes | None = None):
        with urllib.request.urlopen(
            urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=data), timeout=30
        ) as response:
            return json.loads(response.read())

    def _answers(self) -> bool:
        try:
            self._get("/system")
            return True
        except OSError:
            return False

    def count(self) -> int:
        return int(self._get("/statistics")["CountInstances"])

    def reports_by_study(self) -> dict[str, int]:
        query = json.dumps({"Level": "Instance", "Query": {"Modality": "SR"}, "Expand": True}).encode()
        found: dict[str, int] = {}
        for instance in self._get("/tools/find", query):
            study = self._get(f"/instances/{instance['ID']}/study")["MainDicomTags"]["StudyInstanceUID"]
            found[study] = found.get(study, 0) + 1
        return found

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.close()


class StoreScpReceiver:
    """DCMTK's storescp as the receiver: every instance it takes is a file of its own (+uf), a second copy included. With ``pki``, TLS only."""

    def __init__(self, folder: Path, pki=None) -> None:
        binary = shutil.which("storescp")
        if binary is None:
            raise SystemExit("DCMTK is not installed (apt-get install dcmtk); or pass --receiver orthanc")
        self.folder, self.port, self.ae_title = folder, free_port(), "STORESCP"
        folder.mkdir(parents=True)
        # --fork: one process per association, as a real archive takes several at once.
        tls = [] if pki is None else ["+tls", str(pki.key("orthanc")), str(pki.cert("orthanc")), "+cf", str(pki.ca)]
        self.process = subprocess.Popen(
            [binary, "--fork", *tls, "-aet", "STORESCP", "-od", str(folder), "+uf", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

    def count(self) -> int:
        return sum(1 for path in self.folder.iterdir() if path.is_file())

    def reports_by_study(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for path in self.folder.iterdir():
            if path.name.startswith("SR"):
                study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
                found[study] = found.get(study, 0) + 1
        return found

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def send_with_pynetdicom(
    port: int, files: list[str], tls: tuple[str, str, str] | None
) -> list[tuple[float, float, int]]:
    """One client process: one association (over TLS with ``tls``: CA, certificate, key), every file by C-STORE; (start, end, status) per file."""
    from pynetdicom import AE

    from lungdet.tls import client_context

    ae = AE("LOADSCU")
    ae.add_requested_context(
        "1.2.840.10008.5.1.4.1.1.7", ["1.2.840.10008.1.2.4.50"]
    )  # the samples: Secondary Capture, JPEG Baseline
    ae.dimse_timeout = ae.network_timeout = 120
    tls_args = None if tls is None else (client_context(Path(tls[0]), cert=Path(tls[1]), key=Path(tls[2])), "127.0.0.1")
    association = ae.associate("127.0.0.1", port, ae_title="LUNGDET", tls_args=tls_args)
    if not association.is_established:
        raise RuntimeError("lungdet pacs refused the association")
    timings = []
    for path in files:
        dataset = pydicom.dcmread(path)  # read before the clock starts: the sender's disk is not the node's latency
        started = time.time()
        status = association.send_c_store(dataset)
        timings.append((started, time.time(), int(status.Status) if "Status" in status else -1))
    association.release()
    return timings


def send_with_storescu(port: int, files: list[str], tls: tuple[str, str, str] | None) -> tuple[float, float, int]:
    started = time.time()
    options = [] if tls is None else ["+tls", tls[2], tls[1], "+cf", tls[0]]
    done = subprocess.run(
        ["storescu", *options, "-xy", "-aet", "LOADSCU", "-aec", "LUNGDET", "127.0.0.1", str(port), *files],
        capture_output=True,
        text=True,
    )
    return started, time.time(), done.returncode


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def node_latencies(log: str) -> list[float]:
    """From the node's log: seconds from each instance's 'received' line to its 'stored ...'s result' line."""
    received, stored = {}, {}
    for line in log.splitlines():
        match = LOG_TIME.match(line)
        if not match:
            continue
        when = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        text = match.group(2)
        if text.startswith("received ") and " again" not in text:
            received[text.split()[1]] = when
        elif text.startswith("stored "):
            stored[text.split()[1].removesuffix("'s")] = when
    return [stored[sop] - received[sop] for sop in stored if sop in received]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="checkpoint for the node (default: the tests' tiny serving checkpoint, written here)",
    )
    parser.add_argument(
        "--samples",
        type=Path,
        default=DEFAULT_SAMPLES,
        help="folder of real DICOMs to copy (default ../shared/data/rsna_sample/...)",
    )
    parser.add_argument("--instances", type=int, default=200, help="instances to send (default 200)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent sender processes (default 4)")
    parser.add_argument(
        "--client",
        choices=("pynetdicom", "storescu"),
        default="pynetdicom",
        help="the senders (default pynetdicom: per-instance latency)",
    )
    parser.add_argument(
        "--receiver",
        choices=("orthanc", "storescp"),
        default="orthanc",
        help="where the node stores its results (default orthanc)",
    )
    parser.add_argument("--overlay", action="store_true", help="the node also stores an overlay per instance")
    parser.add_argument("--device", default="cpu", help="the node's --device (default cpu)")
    parser.add_argument(
        "--max-seconds", type=float, default=900, help="give up waiting for results after this long (default 900)"
    )
    parser.add_argument(
        "--security",
        default="plain",
        help="comma-separated variants run one after the other: plain, tls (DICOM TLS both ways, client certificates "
        "required), tls+audit (and --audit FILE); default plain",
    )
    args = parser.parse_args()

    samples = sorted(args.samples.glob("*.dcm"))
    if not samples:
        raise SystemExit(f"{args.samples}: no .dcm files; pass --samples FOLDER")
    variants = [variant.strip() for variant in args.security.split(",")]
    unknown = sorted(set(variants) - set(SECURITY))
    if unknown:
        raise SystemExit(f"--security {args.security}: unknown {', '.join(unknown)}; choose from {', '.join(SECURITY)}")
    work = Path(tempfile.mkdtemp(prefix="cstore_load_"))
    checkpoint = args.checkpoint
    sys.path.insert(0, str(REPO))
    if checkpoint is None:
        from tests.conftest import (
            write_serving_checkpoint,
        )  # the tests' tiny model: the node's own costs, not a real model's

        checkpoint = write_serving_checkpoint(work / "serving.pt")
    instances = write_instances(samples, args.instances, work / "instances")
    pki = None
    if any(variant != "plain" for variant in variants):
        from tests.tls_certs import make_pki  # certificates made here with openssl, as the tests make theirs

        pki = make_pki(work / "pki", ("lungdet", "orthanc", "loadscu"))
    print(
        f"lungdet pacs --listen under load: {args.instances} instances from {args.clients} {args.client} processes, receiver {args.receiver}, "
        f"checkpoint {checkpoint.name}, {platform.processor() or platform.machine()} x {os.cpu_count()} cores; work in {work}"
    )
    rows, status = [], 0
    for variant in variants:
        print(f"--- {variant} ---")
        failed, row = run_load(args, checkpoint, instances, work / variant, variant, pki)
        rows.append(row)
        status |= failed
    print(
        "| date | security | client | receiver | instances | clients | ack p50 ms | ack p95 ms | acked/s | results/s |"
    )
    print("\n".join(rows))
    return status


SECURITY = ("plain", "tls", "tls+audit")


def node_command(args: argparse.Namespace, checkpoint: Path, work: Path, receiver, variant: str, pki) -> list[str]:
    """``lungdet pacs --listen`` as the variant runs it: plain TCP, or TLS both ways (client certificates required), and an audit file."""
    command = [
        sys.executable, "-m", "lungdet", "pacs", "--listen", "LUNGDET@127.0.0.1:0", "--allow", "LOADSCU",
        "--send-to", f"{receiver.ae_title}@127.0.0.1:{receiver.port}", "--checkpoint", str(checkpoint),
        "--state-dir", str(work / "state"), "--device", args.device, "--max-inbox", str(max(1000, args.instances)),
    ]  # fmt: skip
    if variant != "plain":
        command += [
            "--tls-cert",
            str(pki.cert("lungdet")),
            "--tls-key",
            str(pki.key("lungdet")),
            "--tls-ca",
            str(pki.ca),
        ]
        command += ["--tls-require-client-cert", "--send-tls"]
    if variant == "tls+audit":
        command += ["--audit", str(work / "audit.log")]
    return command + (["--overlay"] if args.overlay else [])


def run_load(args: argparse.Namespace, checkpoint: Path, instances, work: Path, variant: str, pki) -> tuple[int, str]:
    """One variant: a fresh receiver and node, every instance sent, the results counted; (1 if anything was wrong, its table row)."""
    work.mkdir(parents=True)
    receiver_pki = pki if variant != "plain" else None
    receiver = (
        OrthancReceiver(work / "orthanc", receiver_pki)
        if args.receiver == "orthanc"
        else StoreScpReceiver(work / "storescp", receiver_pki)
    )
    log_path = work / "node.log"
    with open(log_path, "w") as log:
        node = subprocess.Popen(
            node_command(args, checkpoint, work, receiver, variant, pki),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    tls = None if variant == "plain" else (str(pki.ca), str(pki.cert("loadscu")), str(pki.key("loadscu")))
    try:
        ports: list[int] = []

        def listening() -> bool:
            if node.poll() is not None:
                raise SystemExit(f"lungdet pacs exited with {node.returncode}:\n{log_path.read_text()}")
            ports[:] = [
                int(port) for port in re.findall(r"listening as LUNGDET on 127\.0\.0\.1:(\d+)", log_path.read_text())
            ]
            return bool(ports)

        wait_until(listening, "lungdet pacs to listen", START_TIMEOUT_S)
        port = ports[0]
        files = [str(path) for path, _, _ in instances]
        shares = [files[index :: args.clients] for index in range(args.clients)]
        per_set = 2 if args.overlay else 1
        with concurrent.futures.ProcessPoolExecutor(
            args.clients, mp_context=multiprocessing.get_context("spawn")
        ) as pool:
            sender = send_with_pynetdicom if args.client == "pynetdicom" else send_with_storescu
            outcomes = list(pool.map(sender, [port] * args.clients, shares, [tls] * args.clients))
        if args.client == "pynetdicom":
            timings = [timing for client in outcomes for timing in client]
            refused = [timing for timing in timings if timing[2] != 0]
            first, last_ack = min(start for start, _, _ in timings), max(end for _, end, _ in timings)
            latencies = [end - start for start, end, _ in timings]
        else:
            refused = [outcome for outcome in outcomes if outcome[2] != 0]
            first, last_ack = min(start for start, _, _ in outcomes), max(end for _, end, _ in outcomes)
            latencies = []
        results_done = wait_until(
            lambda: receiver.count() >= args.instances * per_set, "every result at the receiver", args.max_seconds
        )
        time.sleep(1.0)  # a second copy of anything would arrive now
        by_study = receiver.reports_by_study()
        studies = [study for _, _, study in instances]
        missing = [study for study in studies if by_study.get(study, 0) == 0]
        doubled = [study for study in studies if by_study.get(study, 0) > 1]
        extra = receiver.count() - args.instances * per_set
        node_times = node_latencies(log_path.read_text())

        print(
            f"refused: {len(refused)}; results: {len(studies) - len(missing)} of {len(studies)} instances have one, "
            f"{len(missing)} none, {len(doubled)} more than one, {extra} extra instance(s) at the receiver"
        )
        if latencies:
            print(
                f"acknowledgement latency (C-STORE request to response): p50 {1000 * statistics.median(latencies):.1f} ms, "
                f"p95 {1000 * percentile(latencies, 0.95):.1f} ms, max {1000 * max(latencies):.1f} ms"
            )
        print(f"acknowledged: {args.instances / (last_ack - first):.1f} instances/s ({last_ack - first:.1f} s for all)")
        print(
            f"results stored: {args.instances / (results_done - first):.1f} result sets/s ({results_done - first:.1f} s from the first send to the last result)"
        )
        if node_times:
            print(
                f"arrival to result stored, per instance (node's log): p50 {statistics.median(node_times):.1f} s, p95 {percentile(node_times, 0.95):.1f} s"
            )
        p50, p95 = (
            (f"{1000 * statistics.median(latencies):.1f}", f"{1000 * percentile(latencies, 0.95):.1f}")
            if latencies
            else ("-", "-")
        )
        row = (
            f"| {datetime.date.today()} | {variant} | {args.client} | {args.receiver} | {args.instances} | {args.clients} | {p50} | {p95} | "
            f"{args.instances / (last_ack - first):.1f} | {args.instances / (results_done - first):.1f} |"
        )
        return (1 if refused or missing or doubled or extra else 0), row
    finally:
        node.terminate()
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            node.kill()
        receiver.stop()


if __name__ == "__main__":
    sys.exit(main())
