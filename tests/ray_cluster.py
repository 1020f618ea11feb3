"""A real two-node Ray cluster on loopback for tests: a head and one more node, each started with ``ray start --num-cpus 1``.

Both nodes register as 127.0.0.2: Ray rewrites 127.0.0.1 to the machine's interface address, but
keeps the other loopback addresses. Ray's GCS and raylet still bind every interface whatever the
node address (Ray 2.60 has no setting for it), so the cluster takes a random token
(``RAY_AUTH_MODE=token``) that every process must present; nothing without it gets in.

Stopped by killing the two ``ray start --block`` process groups by PID, never with ``ray stop``,
which kills every Ray process of the user on the machine (another test session's too).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

NODE_IP = "127.0.0.2"
RAY = Path(sys.executable).parent / "ray"


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc (no psutil here)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # The command name in parentheses may hold spaces; the parent PID is the second field after it.
            parent = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class LoopbackCluster:
    """The running cluster: its address, the environment a driver needs to join it, and the two node processes."""

    address: str
    env: dict[str, str]
    temp_dir: Path
    head: subprocess.Popen
    worker: subprocess.Popen
    logs: list[Path] = field(default_factory=list)

    @classmethod
    def start(cls, timeout: float = 60.0) -> LoopbackCluster:
        port = free_port(NODE_IP)
        temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's Unix sockets live under it
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
        }
        common = [
            "--num-cpus=1",
            f"--node-ip-address={NODE_IP}",
            "--disable-usage-stats",
            "--object-store-memory=200000000",  # Ray's default is 30% of RAM per node
            "--block",
        ]
        logs = [temp_dir / "head.out", temp_dir / "worker.out"]
        head = subprocess.Popen(
            [
                str(RAY),
                "start",
                "--head",
                f"--port={port}",
                f"--ray-client-server-port={free_port(NODE_IP)}",
                "--include-dashboard=false",
                f"--temp-dir={temp_dir}",
                *common,
            ],
            env=env,
            stdout=logs[0].open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        address = f"{NODE_IP}:{port}"
        cluster = cls(address, env, temp_dir, head, head, logs)
        cluster._wait(lambda: _answers(NODE_IP, port), timeout, "the head's port")
        cluster.worker = subprocess.Popen(
            [str(RAY), "start", f"--address={address}", *common],
            env=env,
            stdout=logs[1].open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        cluster._wait(lambda: cluster.alive_nodes() == 2, timeout, "two live nodes")
        return cluster

    def _wait(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or self.head.poll() is not None:
                output = "\n".join(log.read_text(errors="replace")[-2000:] for log in self.logs if log.exists())
                self.stop()
                raise RuntimeError(f"the loopback Ray cluster did not come up ({what}):\n{output}")
            time.sleep(0.2)

    def alive_nodes(self) -> int:
        """Live nodes, asked of the cluster by a short driver in a child process (this process stays free of Ray)."""
        code = (
            f"import ray; ray.init(address={self.address!r}, _node_ip_address={NODE_IP!r}, logging_level='error', "
            "log_to_driver=False); print(sum(n['Alive'] for n in ray.nodes()))"
        )
        done = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        return int(done.stdout.strip() or 0) if done.returncode == 0 else 0

    def worker_node_processes(self, name: str) -> list[int]:
        """PIDs of the non-head node's processes whose command line holds ``name`` (Ray titles actors ``ray::Class``)."""
        return [pid for pid in descendants(self.worker.pid) if name in command_line(pid)]

    def processes(self, name: str) -> list[int]:
        """PIDs of either node's processes whose command line holds ``name``."""
        return [pid for node in (self.head, self.worker) for pid in descendants(node.pid) if name in command_line(pid)]

    def stop(self) -> None:
        """Kill both nodes' process groups (worker first) and wait for the two ``ray start`` processes."""
        for node in (self.worker, self.head):
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait(timeout=30)
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)

    def describe(self) -> str:
        return json.dumps({"address": self.address, "head": self.head.pid, "worker": self.worker.pid})


def _answers(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=0.5).close()
    except OSError:
        return False
    return True
