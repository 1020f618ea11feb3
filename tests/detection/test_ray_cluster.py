"""Tests of detection/ray_cluster.py: what is wrong with a cluster address or a Ray install is one line, and a loopback cluster is joined from loopback."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from lungdet.detection import ray_cluster
from lungdet.errors import LungdetError
from tests.conftest import require_ray


def test_an_address_nothing_answers_on_is_one_line() -> None:
    require_ray()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # free, and closed again: nothing listens there
    started = time.monotonic()
    with pytest.raises(LungdetError, match=rf"--ray 127.0.0.1:{port}: no Ray cluster answers there"):
        ray_cluster.connect(f"127.0.0.1:{port}", verbose=False)
    assert time.monotonic() - started < 10  # Ray's own retries take minutes


def test_without_ray_the_error_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(LungdetError, match=r"install it with: pip install 'lungdet\[ray\]'"):
        ray_cluster.import_ray()


@pytest.mark.parametrize(
    ("address", "node_ip"),
    [
        ("127.0.0.2:6379", "127.0.0.2"),  # a cluster on loopback: the driver registers there too
        ("127.0.0.1:6379", "127.0.0.1"),  # (Ray itself turns 127.0.0.1 into the interface address)
        ("10.0.0.5:6379", None),  # a real network: Ray picks the interface that reaches it
        ("head.example.org:6379", None),
        ("auto", None),
        ("ray://10.0.0.5:10001", None),
        (None, None),  # a Ray of its own
    ],
)
def test_a_loopback_cluster_is_joined_from_its_own_loopback_address(address: str | None, node_ip: str | None) -> None:
    assert ray_cluster.loopback_node_ip(address) == node_ip


def test_cluster_addresses_are_parsed_and_others_left_to_ray() -> None:
    assert ray_cluster.cluster_host_port("10.0.0.5:6379") == ("10.0.0.5", 6379)
    assert ray_cluster.cluster_host_port("auto") is None
    assert ray_cluster.cluster_host_port("ray://10.0.0.5:10001") is None
    assert ray_cluster.cluster_host_port("10.0.0.5:port") is None
