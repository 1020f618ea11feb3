"""Load on ``lungdet serve`` (a benchmark, not a test): concurrent clients posting real DICOMs over loopback.

Starts its own ``lungdet serve`` on 127.0.0.1 (a free port), warms it up with one request per
sample file, then runs ``--clients`` threads that each send ``--requests`` uploads to
``POST /api/v1/detect`` over a kept-alive connection, cycling through the sample DICOMs. It
is bounded in requests and in time (``--max-seconds``), and never targets anything but loopback.

Reports errors (anything but 200, or a failed connection), latency p50/p95/max, requests/s,
and the server's resident memory (VmRSS) after the warm-up (every sample once, then two
concurrent rounds), at its peak and at the end.
The goals: zero errors, and memory growing less than 10% over the run; the exit status is 1
when one is missed. Prints a Markdown row for docs/benchmarks.md.

Run: ``.venv/bin/python benchmarks/serve_load.py [--checkpoint demo_output/run/best.pt] [--clients 16] [--requests 25]``
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLES = REPO.parent / "shared" / "data" / "rsna_sample" / "stage_2_train_images"
MEMORY_GROWTH_GOAL = 0.10
START_TIMEOUT_S = 180
WARM_UP_ROUNDS = 2


def multipart_body(data: bytes, boundary: str) -> bytes:
    return (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.dcm"\r\nContent-Type: application/dicom\r\n\r\n'.encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )


def resident_mb(pid: int) -> float:
    """The process's resident set (VmRSS) in MiB, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def start_server(checkpoint: Path, device: str, max_batch: int, log_path: Path) -> tuple[subprocess.Popen, int]:
    log = open(log_path, "w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lungdet",
            "serve",
            "--checkpoint",
            str(checkpoint),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--device",
            device,
            "--max-batch",
            str(max_batch),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log.close()
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"lungdet serve exited with {process.returncode}:\n{log_path.read_text()}")
        for line in log_path.read_text().splitlines():
            if line.startswith("lungdet serve: open "):
                port = int(line.split()[3].rstrip("/").rsplit(":", 1)[1])
                try:
                    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    connection.request("GET", "/api/v1/health")
                    if connection.getresponse().status == 200:
                        return process, port
                except OSError:
                    pass
        time.sleep(0.2)
    process.kill()
    raise SystemExit(f"lungdet serve did not answer within {START_TIMEOUT_S} s:\n{log_path.read_text()}")


def run_client(
    port: int,
    bodies: list[tuple[bytes, str]],
    count: int,
    offset: int,
    deadline: float,
    results: list,
    lock: threading.Lock,
) -> None:
    """Send ``count`` uploads on one kept-alive connection; append (seconds, status or error text) per request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for index in range(count):
        if time.monotonic() > deadline:
            break
        body, content_type = bodies[(offset + index) % len(bodies)]
        started = time.perf_counter()
        try:
            connection.request("POST", "/api/v1/detect", body=body, headers={"Content-Type": content_type})
            response = connection.getresponse()
            payload = response.read()
            outcome: int | str = response.status
            if response.status == 200:
                json.loads(payload)
        except Exception as error:  # a dropped connection counts as an error, and the client reconnects
            outcome = f"{type(error).__name__}: {error}"
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        with lock:
            results.append((time.perf_counter() - started, outcome))
    connection.close()


def run_clients(
    port: int,
    bodies: list[tuple[bytes, str]],
    clients: int,
    count: int,
    deadline: float,
    results: list,
    lock: threading.Lock,
    *,
    wait: bool = True,
) -> list[threading.Thread]:
    """``clients`` threads of :func:`run_client`, each starting at another sample; joined unless ``wait`` is False."""
    threads = [
        threading.Thread(target=run_client, args=(port, bodies, count, client, deadline, results, lock))
        for client in range(clients)
    ]
    for thread in threads:
        thread.start()
    if wait:
        for thread in threads:
            thread.join()
    return threads


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        default=REPO / "demo_output" / "run" / "best.pt",
        help="checkpoint to serve (default: make demo's)",
    )
    parser.add_argument(
        "--samples",
        type=Path,
        default=DEFAULT_SAMPLES,
        help="folder of DICOMs to upload (default: the 13 real RSNA samples)",
    )
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
    parser.add_argument("--requests", type=int, default=25, help="uploads per client (default 25)")
    parser.add_argument("--max-seconds", type=float, default=600, help="stop sending after this long (default 600)")
    parser.add_argument("--device", default="cpu", help="the server's --device (default cpu)")
    parser.add_argument(
        "--max-batch", type=int, default=8, help="the server's --max-batch (default 8; 1 runs requests one at a time)"
    )
    args = parser.parse_args()

    if not args.checkpoint.is_file():
        raise SystemExit(f"{args.checkpoint}: not found; run 'make demo' first or pass --checkpoint RUN/best.pt")
    samples = sorted(args.samples.glob("*.dcm"))
    if not samples:
        raise SystemExit(f"{args.samples}: no .dcm files to upload")
    bodies = []
    for path in samples:
        boundary = uuid.uuid4().hex
        bodies.append((multipart_body(path.read_bytes(), boundary), f"multipart/form-data; boundary={boundary}"))

    log_path = Path(tempfile.mkdtemp(prefix="serve_load_")) / "serve.log"
    process, port = start_server(args.checkpoint, args.device, args.max_batch, log_path)
    try:
        # Warm-up: every sample once, then one concurrent round, so that the baseline already holds
        # what batches of concurrent requests allocate; growth after that is what a leak would show.
        warm: list = []
        run_client(port, bodies, len(bodies), 0, time.monotonic() + START_TIMEOUT_S, warm, threading.Lock())
        run_clients(
            port, bodies, args.clients, WARM_UP_ROUNDS, time.monotonic() + START_TIMEOUT_S, warm, threading.Lock()
        )
        if any(outcome != 200 for _, outcome in warm):
            raise SystemExit(f"warm-up failed: {warm}\n{log_path.read_text()}")
        memory_start = resident_mb(process.pid)
        memory_peak = memory_start
        results: list = []
        lock = threading.Lock()
        deadline = time.monotonic() + args.max_seconds
        started = time.perf_counter()
        clients = run_clients(port, bodies, args.clients, args.requests, deadline, results, lock, wait=False)
        while any(client.is_alive() for client in clients):
            memory_peak = max(memory_peak, resident_mb(process.pid))
            time.sleep(0.25)
        elapsed = time.perf_counter() - started
        memory_end = resident_mb(process.pid)
    finally:
        process.terminate()
        process.wait(timeout=30)

    latencies = [seconds for seconds, _ in results]
    errors = [outcome for _, outcome in results if outcome != 200]
    growth = (memory_end - memory_start) / memory_start
    planned = args.clients * args.requests
    print(
        f"lungdet serve under load: {args.clients} clients x {args.requests} requests, {len(samples)} sample DICOMs, {args.checkpoint}, --max-batch {args.max_batch}"
    )
    print(
        f"  requests    {len(results)} of {planned} sent, {len(errors)} errors{f' ({sorted(set(map(str, errors)))[:3]})' if errors else ''}"
    )
    print(
        f"  latency     p50 {percentile(latencies, 0.5) * 1000:.0f} ms   p95 {percentile(latencies, 0.95) * 1000:.0f} ms   max {max(latencies) * 1000:.0f} ms   mean {statistics.mean(latencies) * 1000:.0f} ms"
    )
    print(f"  throughput  {len(results) / elapsed:.1f} requests/s over {elapsed:.1f} s")
    print(
        f"  memory      {memory_start:.0f} MiB after warm-up, peak {memory_peak:.0f}, end {memory_end:.0f} ({growth:+.1%})"
    )
    met = not errors and len(results) == planned and growth < MEMORY_GROWTH_GOAL
    print(
        f"  goals       {'met' if met else 'NOT met'}: zero errors, every request sent, memory growth under {MEMORY_GROWTH_GOAL:.0%}"
    )
    print()
    print(
        "| date | machine | max batch | clients x requests | errors | p50 / p95 ms | requests/s | RSS start -> end MiB (growth) |"
    )
    print(
        f"| {datetime.date.today()} | {platform.processor() or platform.machine()}, {os.cpu_count()} cores | {args.max_batch} | {args.clients} x {args.requests} | "
        f"{len(errors)} | {percentile(latencies, 0.5) * 1000:.0f} / {percentile(latencies, 0.95) * 1000:.0f} | {len(results) / elapsed:.1f} | "
        f"{memory_start:.0f} -> {memory_end:.0f} ({growth:+.1%}) |"
    )
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
