"""Joining a Ray cluster for ``predict --ray`` and ``cv --ray``: one line for what is wrong, Ray's own output kept out of the terminal.

Nothing here schedules or retries: Ray does. This module only connects, checks that every node
sees the files the work needs before any work starts, and keeps Ray's log lines in a file.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from lungdet.errors import LungdetError

INSTALL_HINT = "pip install 'lungdet[ray]'"


def add_ray_arguments(parser: argparse.ArgumentParser, *, runs: str) -> None:
    """``--ray [ADDRESS]`` and ``--verbose``, as predict and cv take them; ``runs`` says what goes onto Ray."""
    parser.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help=f"{runs}: alone, a Ray on this machine; 'auto' or HOST:PORT, the cluster there "
        "(pip install 'lungdet[ray]'; see docs/scale.md)",
    )
    parser.add_argument("--verbose", action="store_true", help="with --ray: Ray's own progress bars and log lines too")


def import_ray() -> Any:
    """The ``ray`` module, or a one-line error with the install command."""
    try:
        import ray
        import ray.data  # noqa: F401  Ray Data is the part --ray uses; without it the extra is half installed
    except ImportError as error:
        raise LungdetError(f"--ray needs Ray Data ({error}); install it with: {INSTALL_HINT}") from None
    return ray


def cluster_host_port(address: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``HOST:PORT`` address, None for 'auto' or a ``ray://`` client address."""
    if address == "auto" or "://" in address or ":" not in address:
        return None
    host, _, port = address.rpartition(":")
    return (host, int(port)) if port.isdigit() else None


def loopback_node_ip(address: str | None) -> str | None:
    """The address this driver registers as: the cluster's own loopback host when it was started on one, else Ray's choice.

    Left alone, Ray registers a driver under the machine's interface address even when it joins a
    cluster on 127.0.0.2. (Ray rewrites 127.0.0.1 and localhost to the interface address whatever
    is given, so only the other loopback addresses keep a cluster on loopback; see docs/scale.md.)
    """
    host_port = cluster_host_port(address) if address is not None else None
    if host_port is None:
        return None
    try:
        return host_port[0] if ipaddress.ip_address(host_port[0]).is_loopback else None
    except ValueError:  # a host name
        return None


def connect(address: str | None, *, verbose: bool) -> Any:
    """Join the cluster at ``address`` ('auto', ``HOST:PORT``), or start a local Ray when None; returns ``ray``.

    An address that nothing answers on is one line, not Ray's minute of retries.
    """
    ray = import_ray()
    host_port = cluster_host_port(address) if address is not None else None
    if host_port is not None:
        try:
            socket.create_connection(host_port, timeout=5).close()
        except OSError as error:
            raise LungdetError(
                f"--ray {address}: no Ray cluster answers there ({error.strerror or error}); start one with "
                "'ray start --head', or give --ray alone for a Ray on this machine"
            ) from None
    ray.init(
        # 'local' starts a Ray of its own even where `ray start` left a cluster running (ray.init() would join that).
        address=address if address is not None else "local",
        _node_ip_address=loopback_node_ip(address),
        include_dashboard=False if address is None else None,
        log_to_driver=verbose,
        logging_level="INFO" if verbose else "WARNING",
        configure_logging=True,
    )
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = verbose
    if not verbose:
        # Ray Data logs each run's plan at INFO, and a warning that its progress bars are off, which is lungdet's choice.
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    return ray


def largest_node_cpus(ray: Any) -> float:
    """The CPUs of the cluster's largest live node: more than this, a task or actor could never be placed."""
    return max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)


def _missing_here(groups: dict[str, list[str]]) -> tuple[str, dict[str, list[str]]]:
    """On the node this runs on: its address and, for each group of paths, those it cannot see."""
    import ray

    missing = {what: [path for path in paths if not os.path.exists(path)] for what, paths in groups.items()}
    return ray.util.get_node_ip_address(), missing


def check_every_node_sees(ray: Any, groups: dict[str, Sequence[Path]]) -> None:
    """Raise a one-line error naming the node and the path when a node of the cluster cannot see a path.

    ``groups`` names the paths by what they are ("checkpoint": [...], "input folder": [...]), for
    the message. One zero-CPU task pinned to each live node looks at them all, so this waits for
    no busy CPU.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    names = {what: [str(Path(path).resolve()) for path in paths] for what, paths in groups.items()}
    probe = ray.remote(num_cpus=0)(_missing_here)
    nodes = [node["NodeID"] for node in ray.nodes() if node["Alive"]]
    answers = ray.get(
        [
            probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote(names)
            for node in nodes
        ]
    )
    for node_ip, missing_by_group in answers:
        for what, missing in missing_by_group.items():
            if missing:
                raise LungdetError(
                    f"{what} {missing[0]}: not found on the Ray node at {node_ip}"
                    f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; put it on a filesystem every "
                    "node mounts at the same path (see docs/scale.md)"
                )


@contextlib.contextmanager
def ray_output_to(log: Path, *, command: str, verbose: bool) -> Iterator[TextIO]:
    """Ray's own output into ``log``, unless ``verbose``; yields the terminal (the real stderr) for lungdet's bar and lines.

    Ray's C++ core writes to this process's stderr, and its driver prints the cluster's '(raylet)'
    notices (a worker died, a task is retried) to stdout, so both descriptors point at ``log`` for
    the while. On success, or after a LungdetError (lungdet's own one line), the log is deleted; after
    any other failure it stays, and a line names it.
    """
    if verbose:
        yield sys.stderr
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {descriptor: os.dup(descriptor) for descriptor in (1, 2)}
    terminal = os.fdopen(os.dup(saved[2]), "w", buffering=1)
    log.parent.mkdir(parents=True, exist_ok=True)

    def restore() -> None:
        sys.stdout.flush()
        for descriptor, original in saved.items():
            os.dup2(original, descriptor)

    keep_log = False
    try:
        with log.open("ab") as sink:
            for descriptor in saved:
                os.dup2(sink.fileno(), descriptor)
            try:
                yield terminal
            except LungdetError:
                raise  # lungdet's own one line says what is wrong; Ray's messages add nothing to it
            except BaseException:
                keep_log = True
                restore()
                print(f"lungdet {command}: Ray's own messages are in {log}", file=terminal)
                raise
            finally:
                restore()
                for original in saved.values():
                    os.close(original)
                terminal.close()
    finally:
        if not keep_log:
            log.unlink(missing_ok=True)
