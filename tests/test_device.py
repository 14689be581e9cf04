"""The tunnel device functions on a real kernel, in a namespace of their own."""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterator

import pytest

from pytest_svctunnel import device, netns
from pytest_svctunnel.errors import KernelError
from pytest_svctunnel.protocol import Endpoint
from pytest_svctunnel.runs import Run

pytestmark = pytest.mark.root


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


def test_ensure_twice_reuses_the_device(ns: str) -> None:
    device.ensure_vxlan(ns, spec())
    first = _index(ns, "vx0")
    device.ensure_vxlan(ns, spec())
    assert _index(ns, "vx0") == first
    state = device.link_state(ns, "vx0")
    assert state is not None and state.mtu == 1450
    assert sorted(a for a in state.addresses if not a.startswith("fe80:")) == ["10.30.30.2/30", "fd00:3030::2/126"]


def test_ensure_recreates_a_device_with_other_settings(ns: str) -> None:
    device.ensure_vxlan(ns, spec())
    first = _index(ns, "vx0")
    device.ensure_vxlan(ns, spec(vni=444))
    assert _index(ns, "vx0") != first
    out = netns.run(ns, ["ip", "-d", "link", "show", "vx0"])
    assert "vxlan id 444" in out and "srcport 5533 5534" in out and "dstport 5533" in out


def test_set_peer_replaces_the_forwarding_entry(ns: str) -> None:
    device.ensure_vxlan(ns, spec())
    device.set_peer(ns, "vx0", Endpoint(ipaddress.ip_address("192.0.2.7"), 40001))
    device.set_peer(ns, "vx0", Endpoint(ipaddress.ip_address("192.0.2.8"), 40002))
    state = device.link_state(ns, "vx0")
    assert state is not None and state.fdb == ("00:00:00:00:00:00->192.0.2.8:40002",)
    device.set_peer(ns, "vx0", None)
    state = device.link_state(ns, "vx0")
    assert state is not None and state.fdb == ()


def test_links_that_are_not_vxlan_are_never_replaced_or_removed(ns: str) -> None:
    with pytest.raises(KernelError, match="not a VXLAN device"):
        device.ensure_vxlan(ns, spec(name="up1"))
    with pytest.raises(KernelError, match="not a VXLAN device"):
        device.check_name_free(ns, "up1")
    device.delete_vxlan(ns, "up1")
    assert device.link_exists(ns, "up1")
    device.check_name_free(ns, "nothing0")  # a free name is fine


def test_a_device_comes_up_pointed_at_its_peer(ns: str) -> None:
    """With a peer in its spec, a device (also one rebuilt with other settings) is up with its
    forwarding entry already there: nothing sent through it meanwhile (a first ARP request) is lost,
    which cost a rebuilt tunnel a second-long ARP retransmit."""
    peer = Endpoint(ipaddress.ip_address("192.0.2.7"), 40001)
    for settings in (spec(), spec(port=5600)):
        device.ensure_vxlan(ns, dataclasses.replace(settings, peer=peer))
        state = device.link_state(ns, "vx0")
        assert state is not None and state.fdb == ("00:00:00:00:00:00->192.0.2.7:40001",), state
        assert "UP" in netns.run(ns, ["ip", "link", "show", "vx0"])
