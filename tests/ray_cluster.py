"""A real two-node Ray cluster for tests, on loopback alone: a head and one more node, each started with ``ray start --num-cpus 1``.

Ray 2.60's GCS and raylet bind every interface of the machine, whatever node address they are
given, and have no setting to bind one. So the cluster runs in a network namespace of its own
(``unshare --net``) that holds nothing but a loopback interface: there is no other interface to
listen on. Every process that talks to it (the nodes, and each driver a test starts) enters that
namespace with ``nsenter``; :meth:`LoopbackCluster.command` prefixes a command line for it. The
nodes register as 127.0.0.2 (Ray rewrites 127.0.0.1 to an interface address), and a random token
(``RAY_AUTH_MODE=token``) is asked of every process as well.

Making a network namespace needs root (or CAP_SYS_ADMIN), which this machine and CI have; without
it the tests that need the cluster skip (or fail under CI), rather than open Ray's ports to the
network. Stopped by killing the process groups by PID, never with ``ray stop``, which kills every
Ray process of the user on the machine (another test session's too).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NODE_IP = "127.0.0.2"
GCS_PORT = 6379  # the namespace is the cluster's alone: Ray's own default ports are free in it
RAY = Path(sys.executable).parent / "ray"


class NoNamespace(RuntimeError):
    """This machine does not let the tests make a network namespace."""


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
class LoopbackNetwork:
    """A network namespace with only a loopback interface, kept alive by a sleeping process."""

    holder: subprocess.Popen

    @classmethod
    def create(cls) -> LoopbackNetwork:
        holder = subprocess.Popen(
            ["unshare", "--net", "sleep", "infinity"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        network = cls(holder)
        deadline = time.monotonic() + 10
        # unshare forks nothing here: once the holder's namespace differs from ours, it is made.
        while os.readlink(f"/proc/{holder.pid}/ns/net") == os.readlink("/proc/self/ns/net"):
            if holder.poll() is not None or time.monotonic() > deadline:
                raise NoNamespace(f"unshare --net: {holder.stderr.read().decode(errors='replace').strip()}")
            time.sleep(0.01)
        up = subprocess.run(network.command(["ip", "link", "set", "lo", "up"]), capture_output=True, text=True)
        if up.returncode != 0:
            network.close()
            raise NoNamespace(f"ip link set lo up: {up.stderr.strip()}")
        return network

    def command(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside the namespace (nsenter enters it and executes the command in its own place)."""
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net", *command]

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait(timeout=10)


@dataclass
class LoopbackCluster:
    """The running cluster: its address, its namespace, the environment a driver needs, and the two node processes."""

    address: str
    network: LoopbackNetwork
    env: dict[str, str]
    temp_dir: Path
    head: subprocess.Popen | None = None
    worker: subprocess.Popen | None = None
    logs: list[Path] = field(default_factory=list)

    @classmethod
    def start(cls, timeout: float = 60.0) -> LoopbackCluster:
        network = LoopbackNetwork.create()
        temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's Unix sockets live under it
        env = {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": secrets.token_hex(32),
        }
        cluster = cls(f"{NODE_IP}:{GCS_PORT}", network, env, temp_dir)
        common = [
            "--num-cpus=1",
            f"--node-ip-address={NODE_IP}",
            "--disable-usage-stats",
            "--object-store-memory=200000000",  # Ray's default is 30% of RAM per node
            "--block",
        ]
        head = [f"--port={GCS_PORT}", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
        cluster.head = cluster._node("head", ["--head", *head, *common])
        cluster._wait(cluster._head_answers, timeout, "the head's port")
        cluster.worker = cluster._node("worker", [f"--address={cluster.address}", *common])
        cluster._wait(lambda: cluster.alive_nodes() == 2, timeout, "two live nodes")
        return cluster

    def command(self, command: Sequence[str]) -> list[str]:
        """``command`` as a process of the cluster's network: run it with :attr:`env`."""
        return self.network.command(command)

    def _node(self, name: str, arguments: list[str]) -> subprocess.Popen:
        log = self.temp_dir / f"{name}.out"
        self.logs.append(log)
        return subprocess.Popen(
            self.command([str(RAY), "start", *arguments]),
            env=self.env,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def _head_answers(self) -> bool:
        code = f"import socket; socket.create_connection(({NODE_IP!r}, {GCS_PORT}), timeout=0.5).close()"
        return subprocess.run(self.command([sys.executable, "-c", code]), capture_output=True).returncode == 0

    def _wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline or (self.head is not None and self.head.poll() is not None):
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
        done = subprocess.run(
            self.command([sys.executable, "-c", code]), env=self.env, capture_output=True, text=True, timeout=60
        )
        return int(done.stdout.strip() or 0) if done.returncode == 0 else 0

    def processes(self, name: str) -> list[int]:
        """PIDs of either node's processes whose command line holds ``name`` (Ray titles actors ``ray::Class``)."""
        nodes = [node for node in (self.head, self.worker) if node is not None]
        return [pid for node in nodes for pid in descendants(node.pid) if name in command_line(pid)]

    def stop(self) -> None:
        """Kill both nodes' process groups (worker first), wait for the two ``ray start`` processes, close the namespace."""
        for node in (self.worker, self.head):
            if node is None:
                continue
            try:
                os.killpg(node.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            node.wait(timeout=30)
        self.network.close()
        subprocess.run(["rm", "-rf", str(self.temp_dir)], check=False)


def isolated(command: Sequence[str]) -> list[str]:
    """``command`` in a network namespace of its own with only loopback, for a ``--ray`` that starts a Ray of its own."""
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh", *command]
