"""Tunnel devices in bulk on a real kernel, in a namespace of their own."""

from __future__ import annotations

import dataclasses
import ipaddress
import sys
from collections.abc import Iterator

import pytest

from pytest_svctunnel import device, linkbatch, netns, rtnl
from pytest_svctunnel.errors import KernelError
from pytest_svctunnel.protocol import Endpoint
from pytest_svctunnel.runs import Run

from .helpers import wait_until

pytestmark = pytest.mark.root
GROUP = 0x53560042


@pytest.fixture
def ns(run: Run) -> Iterator[str]:
    """A namespace with a veth 'up0' (192.0.2.1/24, 2001:db8::1/64) to use as underlay."""
    name = f"svt-{run.id}-dev"
    netns.create(name)
    try:
        with device.netlink(name) as ipr:
            ipr.link("add", ifname="up0", kind="veth", peer={"ifname": "up1"})
            index = ipr.link_lookup(ifname="up0")[0]
            ipr.addr("add", index=index, address="192.0.2.1", prefixlen=24)
            ipr.addr("add", index=index, address="2001:db8::1", prefixlen=64, flags=device.IFA_F_NODAD)
            for link in ("up0", "up1", "lo"):
                ipr.link("set", index=ipr.link_lookup(ifname=link)[0], state="up")
        yield name
    finally:
        netns.remove(name)


def spec(name: str = "vx0", vni: int = 333, port: int = 5533) -> device.VxlanSpec:
    return device.VxlanSpec(
        name,
        vni,
        port,
        ipaddress.ip_address("192.0.2.1"),
        "up0",
        1450,
        (ipaddress.ip_interface("10.30.30.2/30"), ipaddress.ip_interface("fd00:3030::2/126")),
    )


def _index(ns: str, name: str) -> int:
    with device.netlink(ns) as ipr:
        return int(ipr.link_lookup(ifname=name)[0])


PEER = Endpoint(ipaddress.ip_address("192.0.2.7"), 40001)


def test_build_twice_reuses_the_device(ns: str) -> None:
    linkbatch.build(ns, [spec()], GROUP)
    first = _index(ns, "vx0")
    linkbatch.build(ns, [spec()], GROUP)
    assert _index(ns, "vx0") == first
    state = device.link_state(ns, "vx0")
    assert state is not None and state.mtu == 1450
    assert sorted(a for a in state.addresses if not a.startswith("fe80:")) == ["10.30.30.2/30", "fd00:3030::2/126"]


def udp_checksum(ns: str, name: str) -> bool:
    with rtnl.opened(ns) as nl:
        return nl.links()[name].vxlan[rtnl.VXLAN_UDP_CSUM] == b"\1"


def test_over_ipv4_the_outer_udp_checksum_is_zero_and_offload_stays(ns: str) -> None:
    """RFC 7348's zero checksum over IPv4 (a checksum there died behind the test cluster's NAT and bridge
    for every TCP segment); a device of an older run with a checksum is made anew."""
    linkbatch.build(ns, [spec()], GROUP)
    assert not udp_checksum(ns, "vx0") and rtnl.tx_checksum(ns, "vx0") is True
    with device.netlink(ns) as ipr:
        ipr.link("del", index=_index(ns, "vx0"))
        ipr.link("add", ifname="vx0", kind="vxlan", vxlan_id=333, vxlan_port=5533, vxlan_udp_csum=1,
                 vxlan_port_range={"low": 5533, "high": 5534}, vxlan_learning=0,
                 vxlan_local="192.0.2.1", vxlan_link=_index(ns, "up0"))  # fmt: skip
    assert udp_checksum(ns, "vx0")
    linkbatch.build(ns, [spec()], GROUP)
    assert not udp_checksum(ns, "vx0")


def test_checksums_are_finished_before_encapsulation_when_asked(ns: str) -> None:
    """For a path with a proxy that relays frames from user space (an unfinished inner checksum would arrive
    as it is); a device built again follows the latest call, both ways."""
    linkbatch.build(ns, [spec()], GROUP, finish_checksums=True)
    assert rtnl.tx_checksum(ns, "vx0") is False
    linkbatch.build(ns, [spec()], GROUP)
    assert rtnl.tx_checksum(ns, "vx0") is True
    linkbatch.build(ns, [spec()], GROUP, finish_checksums=True)
    assert rtnl.tx_checksum(ns, "vx0") is False


def test_over_ipv6_the_checksum_stays_and_is_finished_before_encapsulation(ns: str) -> None:
    """A zero UDP checksum is refused over IPv6: there the kernel finishes inner checksums first."""
    six = dataclasses.replace(spec(), local=ipaddress.ip_address("2001:db8::1"), mtu=1430)
    linkbatch.build(ns, [six], GROUP)
    assert udp_checksum(ns, "vx0") and rtnl.tx_checksum(ns, "vx0") is False
    rtnl.set_tx_checksums(ns, {"vx0": True})
    linkbatch.build(ns, [six], GROUP)  # reused as it is, and offload is off again
    assert rtnl.tx_checksum(ns, "vx0") is False


def test_build_recreates_a_device_with_other_settings(ns: str) -> None:
    linkbatch.build(ns, [spec()], GROUP)
    first = _index(ns, "vx0")
    linkbatch.build(ns, [spec(vni=444)], GROUP)
    assert _index(ns, "vx0") != first
    out = netns.run(ns, ["ip", "-d", "link", "show", "vx0"])
    assert "vxlan id 444" in out and "srcport 5533 5534" in out and "dstport 5533" in out
    assert f"group {GROUP}" in out and "nolearning" in out and "local 192.0.2.1 dev up0" in out


def test_point_replaces_the_forwarding_entry(ns: str) -> None:
    linkbatch.build(ns, [spec()], GROUP)
    linkbatch.point(ns, ["vx0"], Endpoint(ipaddress.ip_address("192.0.2.7"), 40001))
    linkbatch.point(ns, ["vx0"], Endpoint(ipaddress.ip_address("192.0.2.8"), 40002))
    state = device.link_state(ns, "vx0")
    assert state is not None and state.fdb == ("00:00:00:00:00:00->192.0.2.8:40002",)
    linkbatch.point(ns, ["vx0"], None)
    state = device.link_state(ns, "vx0")
    assert state is not None and state.fdb == ()


def test_an_entry_at_the_devices_own_port_is_replaced_and_withdrawn(ns: str) -> None:
    """The kernel's dump leaves out an entry's port when it is the device's own: removing it must
    then leave the port out too, or the kernel finds nothing and the old peer keeps its traffic."""
    linkbatch.build(ns, [spec()], GROUP)
    same_port = Endpoint(ipaddress.ip_address("192.0.2.7"), 5533)
    linkbatch.point(ns, ["vx0"], same_port)
    linkbatch.point(ns, ["vx0"], Endpoint(ipaddress.ip_address("192.0.2.8"), 40002))
    state = device.link_state(ns, "vx0")
    assert state is not None and state.fdb == ("00:00:00:00:00:00->192.0.2.8:40002",), state.fdb
    linkbatch.point(ns, ["vx0"], same_port)
    linkbatch.point(ns, ["vx0"], None)
    state = device.link_state(ns, "vx0")
    assert state is not None and state.fdb == (), state.fdb


def test_links_that_are_not_vxlan_are_never_replaced_or_removed(ns: str) -> None:
    with pytest.raises(KernelError, match=r"up1 \(veth link\) already exist\(s\) and is not a VXLAN device"):
        linkbatch.build(ns, [spec(), spec(name="up1", vni=334)], GROUP)
    assert not device.link_exists(ns, "vx0"), "refused before any change"
    assert linkbatch.existing(ns, ["up1", "nothing0"]) == {"up1": "veth"}
    linkbatch.remove(ns, ["up1"], GROUP)
    assert device.link_exists(ns, "up1")


def test_a_device_comes_up_pointed_at_its_peer(ns: str) -> None:
    """With a peer in its spec, a device (also one rebuilt with other settings) is up with its
    forwarding entry already there: nothing sent through it meanwhile (a first ARP request) is lost,
    which cost a rebuilt tunnel a second-long ARP retransmit."""
    for settings in (spec(), spec(port=5600)):
        linkbatch.build(ns, [dataclasses.replace(settings, peer=PEER)], GROUP)
        state = device.link_state(ns, "vx0")
        assert state is not None and state.fdb == ("00:00:00:00:00:00->192.0.2.7:40001",), state
        assert "UP" in netns.run(ns, ["ip", "link", "show", "vx0"])


def many(count: int, port: int = 5533) -> list[device.VxlanSpec]:
    return [
        device.VxlanSpec(
            f"vx{i}",
            1000 + i,
            port,
            ipaddress.ip_address("192.0.2.1"),
            "up0",
            1450,
            (
                ipaddress.IPv4Interface((0x0A1E0000 + 4 * i + 2, 30)),
                ipaddress.IPv6Interface((0xFD00 << 112 | 4 * i + 2, 126)),
            ),
            PEER,
        )
        for i in range(count)
    ]


def test_hundreds_of_devices_are_built_pointed_and_removed_as_one_group(ns: str) -> None:
    specs = many(300)
    linkbatch.build(ns, specs, GROUP)
    links = netns.run(ns, ["ip", "-d", "link", "show", "group", str(GROUP)])
    assert links.count("vxlan id") == 300 and links.count("state UNKNOWN") == 300  # up
    addresses = netns.run(ns, ["ip", "addr", "show"])
    assert all(f"{a.ip}/" in addresses for s in specs for a in s.addresses)
    fdb = netns.run(ns, ["bridge", "fdb", "show"])
    assert all(f"00:00:00:00:00:00 dev {s.name} dst 192.0.2.7 port 40001 self permanent\n" in fdb for s in specs)
    other = dataclasses.replace(spec(name="other0", vni=7), addresses=())
    linkbatch.build(ns, [other], GROUP + 1)  # another end's device stays
    linkbatch.build(ns, many(300, port=5600), GROUP)  # a new port: every device made anew, still 300
    assert netns.run(ns, ["ip", "-d", "link", "show", "group", str(GROUP)]).count("srcport 5600 5601") == 300
    linkbatch.remove(ns, [s.name for s in specs], GROUP)
    assert netns.run(ns, ["ip", "link", "show", "group", str(GROUP)]) == ""
    assert device.link_exists(ns, "other0") and device.link_exists(ns, "up0")


def test_a_group_with_a_device_of_someone_else_is_removed_one_by_one(ns: str) -> None:
    """The group request would take every link of the group: with one that is not to be removed in it,
    each device goes by itself."""
    linkbatch.build(ns, many(3), GROUP)
    linkbatch.remove(ns, ["vx0", "vx1"], GROUP)
    assert [device.link_exists(ns, f"vx{i}") for i in range(3)] == [False, False, True]


def test_a_refused_request_names_the_device(ns: str) -> None:
    linkbatch.build(ns, [spec()], GROUP)
    with pytest.raises(KernelError, match=r"creating VXLAN device twin0 VNI 333: File exists"):
        linkbatch.build(ns, [spec(name="twin0")], GROUP)  # the same VNI, port and address as vx0
    with pytest.raises(KernelError, match=r"underlay device 'nope0' does not exist in svt-"):
        linkbatch.build(ns, [dataclasses.replace(spec(name="vx9"), underlay="nope0")], GROUP)


SEND_VXLAN = """
import socket, struct, sys
vni, count = int(sys.argv[1]), int(sys.argv[2])
frame = bytes.fromhex("ffffffffffff020000000001" "0800") + bytes(46)
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    for _ in range(count):
        s.sendto(struct.pack("!B3xI", 0x08, vni << 8) + frame, ("192.0.2.1", 5533))
"""


def test_rx_packets_sums_the_named_devices(ns: str) -> None:
    linkbatch.build(ns, [dataclasses.replace(s, peer=None) for s in many(3)], GROUP)
    assert linkbatch.rx_packets(ns, ["vx0", "vx1", "vx2"]) == 0
    netns.run(ns, [sys.executable, "-c", SEND_VXLAN, "1001", "3"])  # to vx1's VNI
    netns.run(ns, [sys.executable, "-c", SEND_VXLAN, "1002", "2"])  # to vx2's
    wait_until(lambda: linkbatch.rx_packets(ns, ["vx1", "vx2"]) == 5, "5 frames received", 5)
    assert linkbatch.rx_packets(ns, ["vx0", "vx1"]) == 3
    assert linkbatch.rx_packets(ns, ["vx0", "nothing"]) == 0
