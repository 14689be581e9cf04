"""The neighbour-table room check (pure logic over a /proc tree written by the test), and the live
kernel's figures being readable here."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_svctunnel.errors import ConfigError
from pytest_svctunnel.names import device_names
from pytest_svctunnel.neighbours import check_room, in_use, limit
from pytest_svctunnel.networks import parse_request, plan_networks

STAT_HEADER = "entries  allocs   destroys hash_grows\n"


def proc(tmp_path: Path, v4: tuple[int, int], v6: tuple[int, int]) -> Path:
    """A /proc with gc_thresh3 and the entries in use for both families."""
    for family, cache, (top, used) in (("ipv4", "arp_cache", v4), ("ipv6", "ndisc_cache", v6)):
        sysctl = tmp_path / "sys" / "net" / family / "neigh" / "default"
        sysctl.mkdir(parents=True)
        (sysctl / "gc_thresh3").write_text(f"{top}\n")
        stat = tmp_path / "net" / "stat"
        stat.mkdir(parents=True, exist_ok=True)
        (stat / cache).write_text(STAT_HEADER + f"{used:08x} 00000001 00000000 00000004\n" * 2)
    return tmp_path


def networks(count: int, ipv6: bool = True):  # type: ignore[no-untyped-def]
    requests = [parse_request(f"n{i}", None, None if ipv6 else False, None, "t") for i in range(1, count)]
    return plan_networks(333, requests, device_names("abc123"))


def test_256_networks_fit_the_default_tables(tmp_path: Path) -> None:
    check_room(networks(256), proc(tmp_path, (1024, 20), (1024, 20)))


def test_too_many_for_the_ipv6_table_names_its_sysctl(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        check_room(networks(500), proc(tmp_path, (4096, 0), (1024, 30)))
    text = str(info.value)
    assert "500 IPv6 networks need up to 1000 neighbour entries" in text
    assert "holds 1024 for all namespaces together (net.ipv6.neigh.default.gc_thresh3), 30 in use" in text
    assert "sysctl -w net.ipv6.neigh.default.gc_thresh3=2048 net.ipv6.neigh.default.gc_thresh2=1024" in text


def test_a_family_left_out_needs_no_room(tmp_path: Path) -> None:
    check_room(networks(500, ipv6=False)[1:], proc(tmp_path / "a", (4096, 0), (16, 16)))
    with pytest.raises(ConfigError, match="600 IPv4 networks"):
        check_room(networks(600), proc(tmp_path / "b", (1024, 0), (8192, 0)))


def test_a_kernel_that_does_not_say_is_not_checked(tmp_path: Path) -> None:
    check_room(networks(1000), tmp_path)
    assert in_use("arp_cache", tmp_path) == 0 and limit("ipv4", tmp_path) is None


def test_this_kernel_says() -> None:
    assert (limit("ipv4") or 0) >= 128 and (limit("ipv6") or 0) >= 128
    assert in_use("arp_cache") >= 0
