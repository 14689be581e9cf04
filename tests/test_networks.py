"""The network plan: defaults, deterministic extra networks, explicit settings, and conflicts named clearly."""

from __future__ import annotations

import ipaddress
import itertools
import re
from dataclasses import replace
from ipaddress import IPv4Interface, IPv4Network, IPv6Interface, IPv6Network
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_svctunnel.errors import ConfigError
from pytest_svctunnel.names import MAX_DEVICES, device_names
from pytest_svctunnel.netcodec import PodNetwork
from pytest_svctunnel.networks import (
    ATTACH,
    DEFAULT_VNI,
    MAX_VNI,
    Network,
    NetworkMap,
    NetworkRequest,
    natural_order,
    parse_request,
    plan_attached,
    plan_networks,
    single_network,
    spread_over_pods,
)
from pytest_svctunnel.protocol import Hello, Message, decode, encode, hello_size
from pytest_svctunnel.targets import Target
from pytest_svctunnel.values import ifname_problem

DEVS = device_names("abc123")
WHERE = "tests/test_x.py::test_marked"


def req(name: str, ipv4: Any = None, ipv6: Any = None, vni: Any = None, where: str = WHERE) -> NetworkRequest:
    return parse_request(name, ipv4, ipv6, vni, where)


def by_name(nets: tuple[Network, ...]) -> dict[str, Network]:
    return {n.name: n for n in nets}


# -- the default network ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("vni", [DEFAULT_VNI, 1, MAX_VNI, 4242], ids=["333", "1", "max", "4242"])
def test_default_network_only(vni: int) -> None:
    nets = plan_networks(vni, [], DEVS)
    assert nets == (
        Network(
            name="default",
            vni=vni,
            dev=DEVS[0],
            local_ipv4=IPv4Interface("10.30.30.2/30"),
            remote_ipv4=IPv4Interface("10.30.30.1/30"),
            local_ipv6=IPv6Interface("fd00:3030::2/126"),
            remote_ipv6=IPv6Interface("fd00:3030::1/126"),
            mtu=0,
        ),
    )
    assert nets[0].pod_network() == PodNetwork(
        vni, DEVS[0], IPv4Interface("10.30.30.1/30"), IPv6Interface("fd00:3030::1/126")
    )


def test_with_mtu_changes_only_the_mtu() -> None:
    net = plan_networks(DEFAULT_VNI, [], DEVS)[0]
    built = net.with_mtu(1450)
    assert built.mtu == 1450 and net.mtu == 0
    assert built == Network(**{**net.__dict__, "mtu": 1450})


# -- extra networks with defaults ------------------------------------------------------------------------------


def test_extra_networks_get_deterministic_blocks_and_vnis_ordered_by_name() -> None:
    nets = plan_networks(DEFAULT_VNI, [req("beta"), req("alpha"), req("gamma")], DEVS)
    assert [n.name for n in nets] == ["default", "alpha", "beta", "gamma"]
    assert [n.dev for n in nets] == DEVS[:4]
    assert [n.vni for n in nets] == [333, 334, 335, 336]
    alpha, beta, gamma = nets[1:]
    assert (alpha.local_ipv4, alpha.remote_ipv4) == (IPv4Interface("10.30.30.6/30"), IPv4Interface("10.30.30.5/30"))
    assert (beta.local_ipv4, beta.remote_ipv4) == (IPv4Interface("10.30.30.10/30"), IPv4Interface("10.30.30.9/30"))
    assert (gamma.local_ipv4, gamma.remote_ipv4) == (IPv4Interface("10.30.30.14/30"), IPv4Interface("10.30.30.13/30"))
    assert (alpha.local_ipv6, alpha.remote_ipv6) == (
        IPv6Interface("fd00:3030::6/126"),
        IPv6Interface("fd00:3030::5/126"),
    )
    assert (beta.local_ipv6, beta.remote_ipv6) == (
        IPv6Interface("fd00:3030::a/126"),
        IPv6Interface("fd00:3030::9/126"),
    )
    assert gamma.local_ipv6 == IPv6Interface("fd00:3030::e/126")


def test_plan_does_not_depend_on_request_order() -> None:
    requests = [req("c"), req("a", vni=900), req("b", ipv4="10.30.30.4/30"), req("d", ipv6=False)]
    plans = {plan_networks(DEFAULT_VNI, list(order), DEVS) for order in itertools.permutations(requests)}
    assert len(plans) == 1


def test_same_request_on_several_tests_is_one_network() -> None:
    nets = plan_networks(DEFAULT_VNI, [req("a", where="t1"), req("a", where="t2"), req("a", where="t3")], DEVS)
    assert [n.name for n in nets] == ["default", "a"]


def test_allocation_skips_explicit_vnis_and_blocks() -> None:
    nets = by_name(
        plan_networks(DEFAULT_VNI, [req("a"), req("b", ipv4="10.30.30.4/31", ipv6="fd00:3030::4/127", vni=334)], DEVS)
    )
    assert nets["b"].vni == 334
    assert nets["a"].vni == 335
    assert nets["a"].local_ipv4 == IPv4Interface("10.30.30.10/30")
    assert nets["a"].local_ipv6 == IPv6Interface("fd00:3030::a/126")
    assert (nets["b"].local_ipv4, nets["b"].remote_ipv4) == (
        IPv4Interface("10.30.30.5/31"),
        IPv4Interface("10.30.30.4/31"),
    )


def test_allocated_vni_skips_a_later_explicit_one() -> None:
    nets = by_name(plan_networks(100, [req("a"), req("b"), req("c", vni=102)], DEVS))
    assert (nets["a"].vni, nets["b"].vni, nets["c"].vni) == (101, 103, 102)


def test_allocated_vni_stays_in_range_at_the_top() -> None:
    """default_vni + index must wrap inside 1..16777215 like the skipping does."""
    nets = plan_networks(MAX_VNI, [req("a"), req("b")], DEVS)
    vnis = [n.vni for n in nets]
    assert all(1 <= v <= MAX_VNI for v in vnis), vnis
    assert len(set(vnis)) == len(vnis)


def test_explicit_settings_are_honored() -> None:
    net = plan_networks(DEFAULT_VNI, [req("x", ipv4="10.40.0.0/30", ipv6="fd00:40::/126", vni=900)], DEVS)[1]
    assert net == Network(
        "x",
        900,
        DEVS[1],
        IPv4Interface("10.40.0.2/30"),
        IPv4Interface("10.40.0.1/30"),
        IPv6Interface("fd00:40::2/126"),
        IPv6Interface("fd00:40::1/126"),
    )


def test_explicit_larger_subnet_uses_its_first_two_hosts() -> None:
    net = plan_networks(DEFAULT_VNI, [req("x", ipv4=IPv4Network("192.168.7.0/24"))], DEVS)[1]
    assert (net.local_ipv4, net.remote_ipv4) == (IPv4Interface("192.168.7.2/24"), IPv4Interface("192.168.7.1/24"))
    assert net.local_ipv6 == IPv6Interface("fd00:3030::6/126")  # IPv6 still defaulted


@pytest.mark.parametrize(
    ("ipv4", "ipv6", "has4", "has6"),
    [(False, None, False, True), (None, False, True, False), (False, "fd00:40::/64", False, True)],
    ids=["no-ipv4", "no-ipv6", "no-ipv4-explicit-ipv6"],
)
def test_a_family_can_be_left_out(ipv4: Any, ipv6: Any, has4: bool, has6: bool) -> None:
    net = plan_networks(DEFAULT_VNI, [req("x", ipv4=ipv4, ipv6=ipv6)], DEVS)[1]
    assert (net.local_ipv4 is not None, net.remote_ipv4 is not None) == (has4, has4)
    assert (net.local_ipv6 is not None, net.remote_ipv6 is not None) == (has6, has6)
    pod = net.pod_network()
    assert (pod.ipv4 is not None, pod.ipv6 is not None) == (has4, has6)


def test_leaving_ipv4_out_does_not_use_up_a_block() -> None:
    nets = by_name(plan_networks(DEFAULT_VNI, [req("a", ipv4=False), req("b")], DEVS))
    assert nets["b"].local_ipv4 == IPv4Interface("10.30.30.6/30")
    assert nets["b"].local_ipv6 == IPv6Interface("fd00:3030::a/126")


def test_1023_extra_networks_fit_and_follow_each_other() -> None:
    nets = plan_networks(DEFAULT_VNI, [req(f"vlan{i}") for i in range(1, 1024)], DEVS)
    assert len(nets) == 1024 and [n.dev for n in nets] == DEVS
    assert [n.name for n in nets[:4]] == ["default", "vlan1", "vlan2", "vlan3"]  # numbers sort as numbers
    assert [n.vni for n in nets] == list(range(DEFAULT_VNI, DEFAULT_VNI + 1024))
    assert [n.local_ipv4 for n in nets[63:66]] == [
        IPv4Interface("10.30.30.254/30"),
        IPv4Interface("10.30.31.2/30"),  # past the first /24 the blocks go on in the next
        IPv4Interface("10.30.31.6/30"),
    ]
    assert nets[-1].local_ipv4 == IPv4Interface("10.30.45.254/30")
    assert nets[-1].local_ipv6 == IPv6Interface("fd00:3030::ffe/126")


def test_planned_networks_go_on_the_wire_in_one_small_hello() -> None:
    nets = plan_networks(DEFAULT_VNI, [req(f"n{i:04}") for i in range(1023)], DEVS)
    hello = Message(b"12345678", 1, 1, Hello(1450, tuple(n.pod_network() for n in nets)))
    datagram = encode(hello, b"k")
    assert decode(datagram, b"k") == hello
    assert len(datagram) == 32 + 8 + 48 + len("svtabc123-") + 32  # one run


def test_the_blocks_go_around_the_pool_past_its_top() -> None:
    """Everything from 10.30.30.4 to the top of 10.30.0.0/16 is taken: the next block is 10.30.0.0/30."""
    blocks = ["10.30.30.4/30", "10.30.30.8/29", "10.30.30.16/28", "10.30.30.32/27", "10.30.30.64/26"]
    blocks += ["10.30.30.128/25", "10.30.31.0/24", "10.30.32.0/19", "10.30.64.0/18", "10.30.128.0/17"]
    taken = [req(f"t{i}", ipv4=block) for i, block in enumerate(blocks)]
    nets = by_name(plan_networks(DEFAULT_VNI, [*taken, req("x"), req("y")], DEVS))
    assert nets["x"].local_ipv4 == IPv4Interface("10.30.0.2/30")
    assert nets["y"].local_ipv4 == IPv4Interface("10.30.0.6/30")


def test_natural_order_puts_numbers_in_number_order() -> None:
    names = ["vlan10", "vlan9", "a00", "a0", "b", "vlan100", "a1", "vlan09"]
    assert sorted(names, key=natural_order) == ["a0", "a00", "a1", "b", "vlan09", "vlan9", "vlan10", "vlan100"]


# -- errors ----------------------------------------------------------------------------------------------------

PLAN_ERRORS: dict[str, tuple[list[NetworkRequest], list[str]]] = {
    "same-name-different-settings": (
        [req("a", ipv4="10.40.0.0/30", where="test_one"), req("a", where="test_two")],
        ["'a'", "test_one", "test_two", "different settings"],
    ),
    "same-name-vni-vs-none": (
        [req("a", vni=500, where="test_one"), req("a", vni=None, where="test_two")],
        ["'a'", "test_one", "test_two"],
    ),
    "same-name-disabled-vs-default": (
        [req("a", ipv6=False, where="test_one"), req("a", where="test_two")],
        ["'a'", "test_one", "test_two"],
    ),
    "overlapping-explicit-ipv4": (
        [req("a", ipv4="10.40.0.0/29"), req("b", ipv4="10.40.0.4/30")],
        ["'a'", "'b'", "10.40.0.0/29", "10.40.0.4/30", "overlap"],
    ),
    "overlapping-explicit-ipv6": (
        [req("a", ipv6="fd00:40::/64"), req("b", ipv6="fd00:40::/126")],
        ["'a'", "'b'", "overlap"],
    ),
    "the-default-has-no-room-left": (
        [req("a", ipv4="10.30.0.0/16")],
        ["'default' gets no free 10.30.0.0/16 block", "'a' (10.30.0.0/16)", "--svctunnel-ipv4/--svctunnel-ipv6"],
    ),
    "duplicate-explicit-vni": (
        [req("a", vni=500), req("b", vni=500)],
        ["'a'", "'b'", "500"],
    ),
    "vni-of-the-default": (
        [req("a", vni=DEFAULT_VNI)],
        ["'default'", "'a'", str(DEFAULT_VNI), "--svctunnel-vni"],
    ),
    "too-many-networks": (
        [req(f"n{i:04}") for i in range(1024)],
        ["at most 1023 extra networks"],
    ),
    "pool-exhausted": (
        [
            req("a", ipv4="10.30.30.4/30"),
            req("b", ipv4="10.30.30.8/29"),
            req("c", ipv4="10.30.30.16/28"),
            req("d", ipv4="10.30.30.32/27"),
            req("e", ipv4="10.30.30.64/26"),
            req("f", ipv4="10.30.30.128/25"),
            req("g", ipv4="10.30.31.0/24"),
            req("h", ipv4="10.30.32.0/19"),
            req("i", ipv4="10.30.64.0/18"),
            req("j", ipv4="10.30.128.0/17"),
            req("k", ipv4="10.30.0.0/20"),
            req("l", ipv4="10.30.16.0/21"),
            req("m", ipv4="10.30.24.0/22"),
            req("n", ipv4="10.30.28.0/23"),
            req("o"),
        ],
        ["'o' gets no free 10.30.0.0/16 block", "'a' (10.30.30.4/30)", "give it addresses of its own (ipv4=/ipv6=)"],
    ),
    "irregular-networks-beyond-one-hello": (
        [req(f"n{i:02}", vni=1000 + 7 * i * i, ipv4=f"10.{50 + i}.0.0/24") for i in range(40)],
        ["the 41 svctunnel networks into the pod end need a", "more than 1200", "vni=, ipv4=, ipv6="],
    ),
}


@pytest.mark.parametrize(("requests", "expected"), PLAN_ERRORS.values(), ids=PLAN_ERRORS.keys())
def test_plan_errors(requests: list[NetworkRequest], expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        plan_networks(DEFAULT_VNI, requests, DEVS)
    for text in expected:
        assert text in str(info.value)


def test_too_many_networks_for_a_short_device_list() -> None:
    with pytest.raises(ConfigError, match="at most 1 extra networks"):
        plan_networks(DEFAULT_VNI, [req("a"), req("b")], DEVS[:2])
    assert len(plan_networks(DEFAULT_VNI, [req("a")], DEVS[:2])) == 2


def test_non_default_vni_conflict_names_the_default() -> None:
    with pytest.raises(ConfigError, match=r"'default' and 'a' both use VNI 77"):
        plan_networks(77, [req("a", vni=77)], DEVS)


PARSE_ERRORS: dict[str, tuple[dict[str, Any], str]] = {
    "name-default-reserved": ({"name": "default"}, "reserved"),
    "name-empty": ({"name": ""}, "name ''"),
    "name-space": ({"name": "a b"}, "name 'a b'"),
    "name-slash": ({"name": "a/b"}, "name 'a/b'"),
    "name-dot": ({"name": "a.b"}, "name 'a.b'"),
    "name-only-dashes": ({"name": "--"}, "name '--'"),
    "name-none": ({"name": None}, "name None"),
    "name-int": ({"name": 5}, "name 5"),
    "vni-0": ({"vni": 0}, "vni=0 is outside"),
    "vni-too-big": ({"vni": MAX_VNI + 1}, "vni=16777216 is outside"),
    "vni-negative": ({"vni": -1}, "vni=-1"),
    "vni-bool": ({"vni": True}, "vni=True"),
    "vni-string": ({"vni": "5"}, "vni='5'"),
    "host-bits-set": ({"ipv4": "10.40.0.1/30"}, "ipv4='10.40.0.1/30' is not a network"),
    "ipv6-host-bits-set": ({"ipv6": "fd00:40::1/126"}, "ipv6='fd00:40::1/126' is not a network"),
    "not-an-address": ({"ipv4": "lan"}, "ipv4='lan' is not a network"),
    "ipv6-given-for-ipv4": ({"ipv4": "fd00:40::/126"}, "ipv4='fd00:40::/126' is an IPv6 network"),
    "ipv4-given-for-ipv6": ({"ipv6": "10.40.0.0/30"}, "ipv6='10.40.0.0/30' is an IPv4 network"),
    "ipv4-slash-32": ({"ipv4": "10.40.0.1/32"}, "fewer than two addresses"),
    "ipv4-no-prefix": ({"ipv4": "10.40.0.1"}, "fewer than two addresses"),
    "ipv6-slash-128": ({"ipv6": "fd00:40::1/128"}, "fewer than two addresses"),
    "ipv4-true": ({"ipv4": True}, "ipv4=True is not a network"),
    "both-families-disabled": ({"ipv4": False, "ipv6": False}, "do not disable both"),
}


@pytest.mark.parametrize(("kwargs", "expected"), PARSE_ERRORS.values(), ids=PARSE_ERRORS.keys())
def test_parse_request_errors(kwargs: dict[str, Any], expected: str) -> None:
    args: dict[str, Any] = {"name": "net", "ipv4": None, "ipv6": None, "vni": None, **kwargs}
    where = "tests/test_web.py::test_login[chrome]"
    with pytest.raises(ConfigError) as info:
        parse_request(args["name"], args["ipv4"], args["ipv6"], args["vni"], where)
    text = str(info.value)
    assert text.startswith(f"svctunnel_network mark on {where}: ")
    assert expected in text


PARSE_OK: dict[str, tuple[dict[str, Any], NetworkRequest]] = {
    "all-defaults": ({}, NetworkRequest("net")),
    "strings": (
        {"ipv4": "10.40.0.0/30", "ipv6": "fd00:40::/126", "vni": 7},
        NetworkRequest("net", IPv4Network("10.40.0.0/30"), IPv6Network("fd00:40::/126"), 7),
    ),
    "network-objects": (
        {"ipv4": IPv4Network("10.40.0.0/24"), "ipv6": IPv6Network("fd00:40::/64")},
        NetworkRequest("net", IPv4Network("10.40.0.0/24"), IPv6Network("fd00:40::/64")),
    ),
    "slash-31": ({"ipv4": "10.40.0.0/31"}, NetworkRequest("net", IPv4Network("10.40.0.0/31"))),
    "slash-127": ({"ipv6": "fd00::/127"}, NetworkRequest("net", None, IPv6Network("fd00::/127"))),
    "ipv4-disabled": ({"ipv4": False}, NetworkRequest("net", False)),
    "ipv6-disabled": ({"ipv6": False}, NetworkRequest("net", None, False)),
    "vni-bounds": ({"vni": MAX_VNI}, NetworkRequest("net", vni=MAX_VNI)),
    "dashes-underscores": ({"name": "a-b_c1"}, NetworkRequest("a-b_c1")),
}


@pytest.mark.parametrize(("kwargs", "expected"), PARSE_OK.values(), ids=PARSE_OK.keys())
def test_parse_request_accepts(kwargs: dict[str, Any], expected: NetworkRequest) -> None:
    args: dict[str, Any] = {"name": "net", "ipv4": None, "ipv6": None, "vni": None, **kwargs}
    got = parse_request(args["name"], args["ipv4"], args["ipv6"], args["vni"], "here")
    assert got == expected
    assert got.where == "here"


# -- single_network (svctunnel connect) ------------------------------------------------------------------------

I4 = IPv4Interface
I6 = IPv6Interface
DEF_L4, DEF_R4 = I4("10.30.30.2/30"), I4("10.30.30.1/30")
DEF_L6, DEF_R6 = I6("fd00:3030::2/126"), I6("fd00:3030::1/126")

SINGLE: dict[str, tuple[tuple[Any, Any, Any, Any], tuple[Any, Any, Any, Any]]] = {
    "cli-defaults": ((None, None, None, None), (DEF_L4, DEF_R4, DEF_L6, DEF_R6)),
    "ipv4-only-derives-remote": (
        (I4("10.40.0.2/24"), None, None, None),
        (I4("10.40.0.2/24"), I4("10.40.0.1/24"), DEF_L6, DEF_R6),
    ),
    "ipv4-first-host-derives-second": (
        (I4("10.40.0.1/30"), None, None, None),
        (I4("10.40.0.1/30"), I4("10.40.0.2/30"), DEF_L6, DEF_R6),
    ),
    "ipv6-only-derives-remote": (
        (None, I6("fd00:40::1/64"), None, None),
        (DEF_L4, DEF_R4, I6("fd00:40::1/64"), I6("fd00:40::2/64")),
    ),
    "both-pairs-given": (
        (I4("10.1.0.5/24"), I6("fd00:1::5/64"), I4("10.1.0.9/24"), I6("fd00:1::9/64")),
        (I4("10.1.0.5/24"), I4("10.1.0.9/24"), I6("fd00:1::5/64"), I6("fd00:1::9/64")),
    ),
    "ipv4-pair-given": (
        (I4("10.1.0.5/24"), None, I4("10.1.0.9/24"), None),
        (I4("10.1.0.5/24"), I4("10.1.0.9/24"), DEF_L6, DEF_R6),
    ),
    "slash-31": (
        (I4("10.9.0.0/31"), None, None, None),
        (I4("10.9.0.0/31"), I4("10.9.0.1/31"), DEF_L6, DEF_R6),
    ),
}


@pytest.mark.parametrize(("args", "expected"), SINGLE.values(), ids=SINGLE.keys())
def test_single_network(args: tuple[Any, Any, Any, Any], expected: tuple[Any, Any, Any, Any]) -> None:
    ipv4, ipv6, remote4, remote6 = args
    net = single_network("svt-c0", 4242, ipv4, ipv6, remote4, remote6)
    assert (net.name, net.dev, net.vni, net.mtu) == ("default", "svt-c0", 4242, 0)
    assert (net.local_ipv4, net.remote_ipv4, net.local_ipv6, net.remote_ipv6) == expected


SINGLE_ERRORS: dict[str, tuple[tuple[Any, Any, Any, Any], str]] = {
    "remote-ipv4-without-ipv4": ((None, None, I4("10.40.0.1/30"), None), "--ipv4 and --remote-ipv4"),
    "remote-ipv6-without-ipv6": ((None, None, None, I6("fd00:40::1/64")), "--ipv6 and --remote-ipv6"),
    "both-remotes-without-locals": ((None, None, I4("10.40.0.1/30"), I6("fd00:40::1/64")), "give both"),
    "ipv4-slash-32": ((I4("10.40.0.1/32"), None, None, None), "10.40.0.1/32 leaves no address"),
    "ipv6-slash-128": ((None, I6("fd00:40::1/128"), None, None), "fd00:40::1/128 leaves no address"),
}


@pytest.mark.parametrize(("args", "expected"), SINGLE_ERRORS.values(), ids=SINGLE_ERRORS.keys())
def test_single_network_errors(args: tuple[Any, Any, Any, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        single_network("svt-c0", 4242, *args)
    assert expected in str(info.value)


# -- device_names ----------------------------------------------------------------------------------------------


@given(st.text("0123456789abcdef", min_size=6, max_size=6))
def test_every_device_name_of_a_run_is_a_valid_interface_name(run_id: str) -> None:
    devices = device_names(run_id)
    assert len(devices) == len(set(devices)) == MAX_DEVICES == 1024
    assert all(ifname_problem(d) is None and d.startswith(f"svt{run_id}-") for d in devices)


# -- properties ------------------------------------------------------------------------------------------------

names = st.from_regex(re.compile(r"[a-z][a-z0-9_-]{0,11}", re.ASCII), fullmatch=True).filter(lambda n: n != "default")
explicit_v4 = st.sampled_from([None, None, None, False, "10.40.0.0/30", "10.50.0.0/24", "10.30.30.4/30"])
explicit_v6 = st.sampled_from([None, None, None, False, "fd00:40::/126", "fd00:3030::8/126"])


@st.composite
def request_lists(draw: st.DrawFn) -> list[NetworkRequest]:
    chosen = draw(st.lists(names, min_size=0, max_size=15, unique=True))
    used_v4: set[str] = set()
    used_v6: set[str] = set()
    used_vni: set[int] = set()
    out = []
    for name in chosen:
        v4 = draw(explicit_v4)
        v6 = draw(explicit_v6)
        if v4 in used_v4:
            v4 = None
        if v6 in used_v6:
            v6 = None
        if v4 is False and v6 is False:
            v6 = None
        vni = draw(st.none() | st.integers(1, MAX_VNI))
        if vni in used_vni:
            vni = None
        if isinstance(v4, str):
            used_v4.add(v4)
        if isinstance(v6, str):
            used_v6.add(v6)
        if vni is not None:
            used_vni.add(vni)
        out.append(req(name, v4, v6, vni))
    return out


@given(st.integers(1, MAX_VNI), request_lists())
def test_property_plans_never_collide(default_vni: int, requests: list[NetworkRequest]) -> None:
    try:
        nets = plan_networks(default_vni, requests, DEVS)
    except ConfigError as exc:
        # The only conflict the generator allows is an explicit VNI equal to the default.
        assert any(r.vni == default_vni for r in requests), exc
        return
    assert [n.name for n in nets] == ["default", *sorted((r.name for r in requests), key=natural_order)]
    assert len({n.dev for n in nets}) == len(nets)
    vnis = [n.vni for n in nets]
    assert len(set(vnis)) == len(vnis)
    assert all(1 <= v <= MAX_VNI for v in vnis), vnis
    blocks4 = [n.local_ipv4.network for n in nets if n.local_ipv4]
    blocks6 = [n.local_ipv6.network for n in nets if n.local_ipv6]
    for a4, b4 in itertools.combinations(blocks4, 2):
        assert not a4.overlaps(b4), (a4, b4)
    for a6, b6 in itertools.combinations(blocks6, 2):
        assert not a6.overlaps(b6), (a6, b6)
    for n in nets:
        for local, remote in ((n.local_ipv4, n.remote_ipv4), (n.local_ipv6, n.remote_ipv6)):
            assert (local is None) == (remote is None)
            if local is not None and remote is not None:
                assert local.network == remote.network and local.ip != remote.ip
    for r, n in zip(sorted(requests, key=lambda r: natural_order(r.name)), nets[1:], strict=True):
        assert n.vni == r.vni or r.vni is None
        assert (n.local_ipv4 is None) == (r.ipv4 is False)
        assert (n.local_ipv6 is None) == (r.ipv6 is False)
        if r.ipv4:
            assert n.local_ipv4 is not None and n.local_ipv4.network == r.ipv4
        if r.ipv6:
            assert n.local_ipv6 is not None and n.local_ipv6.network == r.ipv6


@given(st.integers(0, 2**32 - 1), st.integers(0, 30))
def test_property_single_network_ipv4_derives_a_different_host(address: int, prefix: int) -> None:
    local = ipaddress.IPv4Interface((address, prefix))
    net = single_network("svt-c0", 1, local, None, None, None)
    assert net.local_ipv4 == local
    assert net.remote_ipv4 is not None
    assert net.remote_ipv4.network == local.network
    assert net.remote_ipv4.ip != local.ip
    assert net.remote_ipv4.ip in {local.network[1], local.network[2]}


# -- networks into the user's pods -----------------------------------------------------------------

UPF = Target("cnf", selector="app=upf")
SBC = Target("voice", name="sbc-0")


def test_targets_and_pod_devices_are_planned_per_network() -> None:
    nets = by_name(
        plan_networks(
            DEFAULT_VNI,
            [
                parse_request("media", None, None, None, WHERE, "cnf/app=upf", "net2"),
                parse_request("signal", None, None, None, WHERE, "voice/sbc-0", None),
                req("local"),
            ],
            DEVS,
            default_target=UPF,
            default_pod_dev="net1",
        )
    )
    assert (nets["default"].target, nets["default"].pod_dev) == (UPF, "net1")
    assert (nets["media"].target, nets["media"].pod_dev) == (UPF, "net2")
    assert (nets["signal"].target, nets["signal"].pod_dev) == (SBC, None)
    assert nets["local"].target == UPF, "a network without a target of its own goes to the session's target"
    assert nets["media"].pod_network().dev == "net2"
    assert nets["signal"].pod_network().dev == nets["signal"].dev, "no pod_dev: the same name as this end's"


def test_two_networks_may_not_want_one_device_in_the_same_pods() -> None:
    requests = [
        parse_request("a", None, None, None, WHERE, "cnf/app=upf", "net1"),
        parse_request("b", None, None, None, WHERE, "cnf/app=upf", "net1"),
    ]
    with pytest.raises(ConfigError, match=r"'a' and 'b' both want device net1 in target cnf/app=upf.*pod_dev="):
        plan_networks(DEFAULT_VNI, requests, DEVS)
    other_pods = [requests[0], parse_request("b", None, None, None, WHERE, "voice/sbc-0", "net1")]
    assert len(plan_networks(DEFAULT_VNI, other_pods, DEVS)) == 3, "the same name in other pods is fine"


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"target": "cnf"}, "target='cnf': 'cnf' is not NAMESPACE/SELECTOR or NAMESPACE/NAME"),
        ({"target": "Cnf/app=upf"}, "is not a namespace name"),
        ({"target": "cnf/Upf_0"}, "neither a pod name nor a label selector"),
        ({"pod_dev": "a-name-much-too-long"}, "pod_dev='a-name-much-too-long' is not a device name"),
        ({"pod_dev": "net 1"}, "pod_dev='net 1' is not a device name"),
    ],
)
def test_target_and_pod_dev_errors(kwargs: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_request("media", None, None, None, WHERE, kwargs.get("target"), kwargs.get("pod_dev"))
    assert str(error.value).startswith(f"svctunnel_network mark on {WHERE}: ")
    assert expected in str(error.value)


def counter(start: int = 16) -> Any:
    numbers = itertools.count(start)
    return lambda: f"svtabc123-{next(numbers)}"


def test_each_pod_of_a_target_gets_its_own_device_addresses_and_vni() -> None:
    planned = plan_networks(DEFAULT_VNI, [req("local")], DEVS, default_target=UPF, default_pod_dev="net1")
    planned = (*planned[:1], replace(planned[1], target=None))  # "local" stays in the plugin's own pod
    pods = {UPF: ["upf-a", "upf-b", "upf-c"]}
    built = spread_over_pods(planned, pods, counter())
    default = NetworkMap(built).pods("default")
    assert sorted(default) == ["upf-a", "upf-b", "upf-c"]
    assert default["upf-a"] == replace(planned[0], pod="upf-a"), "the first pod keeps the plan"
    for field in ("dev", "vni", "local_ipv4", "remote_ipv4", "local_ipv6", "remote_ipv6"):
        assert len({getattr(n, field) for n in [*default.values(), planned[1]]}) == 4, field
    assert [n.dev for n in default.values()] == ["svtabc123-0", "svtabc123-16", "svtabc123-17"]
    assert {n.pod_dev for n in default.values()} == {"net1"}
    everything = [a.network for n in built for a in (n.local_ipv4, n.local_ipv6) if a]
    assert not any(a.overlaps(b) for a, b in itertools.combinations(everything, 2) if a.version == b.version)


def test_explicit_addresses_fit_one_pod_only() -> None:
    planned = plan_networks(DEFAULT_VNI, [parse_request("m", "10.40.0.0/30", None, None, WHERE, "cnf/app=upf")], DEVS)
    assert spread_over_pods(planned[1:], {UPF: ["upf-a"]}, counter())[0].pod == "upf-a"
    with pytest.raises(ConfigError, match=r"'m' has addresses of its own, but target cnf/app=upf matches 2 pods"):
        spread_over_pods(planned[1:], {UPF: ["upf-a", "upf-b"]}, counter())


def test_attached_networks_avoid_what_the_session_has() -> None:
    session = plan_networks(DEFAULT_VNI, [req("media")], DEVS)
    requests = [
        parse_request("net1", None, None, None, ATTACH, "cnf/app=upf", "net1"),
        parse_request("net2", None, None, 5000, ATTACH, "cnf/app=upf", "eth7"),
    ]
    attached = by_name(plan_attached(requests, UPF, session, counter(), DEFAULT_VNI))
    assert (attached["net1"].pod_dev, attached["net2"].pod_dev, attached["net2"].vni) == ("net1", "eth7", 5000)
    assert attached["net1"].vni not in {n.vni for n in session}
    taken = [a.network for n in session for a in (n.local_ipv4, n.local_ipv6) if a]
    for net in attached.values():
        assert net.target == UPF
        for address in (net.local_ipv4, net.local_ipv6):
            assert address is not None and not any(address.network.overlaps(t) for t in taken if t.version == 4)
    clash = [parse_request("x", "10.30.30.0/29", None, None, ATTACH, "cnf/app=upf")]
    with pytest.raises(ConfigError, match="overlap"):
        plan_attached(clash, UPF, session, counter(), DEFAULT_VNI)


def test_a_network_in_several_pods_is_found_by_pod() -> None:
    planned = plan_networks(DEFAULT_VNI, [], DEVS, default_target=UPF)
    networks = NetworkMap(spread_over_pods(planned, {UPF: ["upf-a", "upf-b"]}, counter()))
    assert "default" in networks and list(networks) == ["default"] and len(networks) == 1
    with pytest.raises(KeyError, match=r"went into 2 pods \(upf-a, upf-b\); use .pods\('default'\)\[POD\]"):
        networks["default"]
    with pytest.raises(KeyError, match="no svctunnel network 'media'; the session has default"):
        networks.pods("media")
    one = NetworkMap(spread_over_pods(planned, {UPF: ["upf-a"]}, counter()))
    assert one["default"].pod == "upf-a" and list(one.pods("default")) == ["upf-a"]


@pytest.mark.parametrize(
    ("target", "networks", "expected"),
    [
        ("cnf", ["net1"], "svctunnel_attach: target 'cnf' is not NAMESPACE/SELECTOR or NAMESPACE/NAME"),
        ("cnf/app=upf", [], "give at least one network name"),
        (
            "cnf/app=upf",
            {"net1": {"ipv5": "x"}},
            "network 'net1' has unknown settings ipv5; use ipv4, ipv6, vni, pod_dev",
        ),
        (
            "cnf/app=upf",
            ["a-name-too-long-for-a-device"],
            "pod_dev='a-name-too-long-for-a-device' is not a device name",
        ),
        ("cnf/app=upf", {"net1": {"ipv4": "10.1.1.1/30"}}, "svctunnel_attach: ipv4='10.1.1.1/30' is not a network"),
    ],
)
def test_attach_arguments_are_checked_before_anything_happens(target: str, networks: Any, expected: str) -> None:
    from pytest_svctunnel.fixtures import _attach_request

    with pytest.raises(ConfigError) as error:
        _attach_request(target, networks)
    assert expected in str(error.value)


def test_attach_arguments_name_the_pod_devices() -> None:
    from pytest_svctunnel.fixtures import _attach_request

    target, requests = _attach_request("cnf/app=upf", "net1")
    assert target == UPF and [(r.name, r.pod_dev, r.target) for r in requests] == [("net1", "net1", UPF)]
    _, requests = _attach_request(UPF, {"media": {"pod_dev": "eth9", "vni": 4000}})
    assert [(r.name, r.pod_dev, r.vni) for r in requests] == [("media", "eth9", 4000)]


# -- around what other runs on this host hold --------------------------------------------------------------------

OTHER = "run abc999 (pytest session, pid 7)"


def held(*blocks: str, who: str = OTHER) -> list[tuple[str, Any]]:
    return [(who, ipaddress.ip_network(b)) for b in blocks]


def test_a_second_session_gets_the_next_free_blocks() -> None:
    first = plan_networks(DEFAULT_VNI, [req("a")], DEVS)
    taken = [(OTHER, a.network) for n in first for a in (n.local_ipv4, n.local_ipv6) if a is not None]
    second = by_name(plan_networks(DEFAULT_VNI, [req("a")], DEVS, held=taken))
    assert second["default"].local_ipv4 == IPv4Interface("10.30.30.10/30")
    assert second["a"].local_ipv4 == IPv4Interface("10.30.30.14/30")
    assert second["default"].local_ipv6 == IPv6Interface("fd00:3030::a/126")
    assert not {a.network for n in first for a in (n.local_ipv4, n.local_ipv6) if a} & {
        a.network for n in second.values() for a in (n.local_ipv4, n.local_ipv6) if a
    }


def test_a_pinned_default_held_by_another_run_names_it_and_the_options() -> None:
    with pytest.raises(ConfigError) as info:
        plan_networks(DEFAULT_VNI, [], DEVS, default_ipv4=IPv4Network("10.30.30.0/30"), held=held("10.30.30.0/30"))
    text = str(info.value)
    assert "'default' (10.30.30.0/30) overlaps 10.30.30.0/30, which run abc999 (pytest session, pid 7) holds" in text
    assert "--svctunnel-ipv4/--svctunnel-ipv6 (env SVCTUNNEL_IPV4/SVCTUNNEL_IPV6)" in text


def test_a_pinned_mark_held_by_this_host_names_the_interface() -> None:
    with pytest.raises(ConfigError, match=r"'m' \(10.40.0.0/29\) overlaps 10.40.0.0/24, which 10.40.0.9/24 on eth1"):
        plan_networks(
            DEFAULT_VNI, [req("m", ipv4="10.40.0.0/29")], DEVS, held=held("10.40.0.0/24", who="10.40.0.9/24 on eth1")
        )


def test_the_default_network_can_be_moved() -> None:
    default = plan_networks(
        DEFAULT_VNI,
        [req("a")],
        DEVS,
        default_ipv4=IPv4Network("10.31.0.0/29"),
        default_ipv6=IPv6Network("fd00:31::/64"),
    )
    assert (default[0].remote_ipv4, default[0].local_ipv4) == (
        IPv4Interface("10.31.0.1/29"),
        IPv4Interface("10.31.0.2/29"),
    )
    assert default[0].local_ipv6 == IPv6Interface("fd00:31::2/64")
    assert default[1].local_ipv4 == IPv4Interface("10.30.30.2/30"), "the marks' blocks start where they always did"


def test_attached_and_spread_networks_avoid_what_others_hold() -> None:
    session = plan_networks(DEFAULT_VNI, [], DEVS)
    taken = held("10.30.30.4/30", "10.30.30.8/30", "fd00:3030::4/126")
    attached = plan_attached(
        [parse_request("x", None, None, None, ATTACH)], UPF, session, counter(), DEFAULT_VNI, taken
    )
    assert attached[0].local_ipv4 == IPv4Interface("10.30.30.14/30")
    assert attached[0].local_ipv6 == IPv6Interface("fd00:3030::a/126")
    spread = spread_over_pods(
        attached, {UPF: ["upf-a", "upf-b"]}, counter(), session, [*taken, *held("10.30.30.16/30")]
    )
    assert spread[1].local_ipv4 == IPv4Interface("10.30.30.22/30")
    with pytest.raises(ConfigError, match="give it other ipv4=/ipv6="):
        plan_attached([parse_request("y", "10.30.30.8/30", None, None, ATTACH)], UPF, session, counter(), 1, taken)


def test_connect_takes_the_next_free_blocks_or_names_the_holder() -> None:
    net = single_network("vxlan1", 333, None, None, None, None, held("10.30.30.0/30", "fd00:3030::/126"))
    assert (net.local_ipv4, net.remote_ipv4) == (IPv4Interface("10.30.30.6/30"), IPv4Interface("10.30.30.5/30"))
    assert net.local_ipv6 == IPv6Interface("fd00:3030::6/126")
    with pytest.raises(
        ConfigError, match=r"overlaps 10.30.30.0/30, which run abc999 .* holds: give other --ipv4/--ipv6"
    ):
        single_network("vxlan1", 333, IPv4Interface("10.30.30.2/30"), None, None, None, held("10.30.30.0/30"))


def test_every_pods_networks_follow_each_other_in_its_hello() -> None:
    """Pod by pod: each extra pod's networks get consecutive devices, VNIs and blocks, one run."""
    planned = plan_networks(DEFAULT_VNI, [req(f"n{i}") for i in range(1, 59)], DEVS, default_target=UPF)
    built = spread_over_pods(planned, {UPF: ["upf-a", "upf-b", "upf-c"]}, counter(59))
    for pod in ("upf-a", "upf-b", "upf-c"):
        mine = [n for n in built if n.pod == pod]
        assert len(mine) == 59
        assert hello_size([n.pod_network() for n in mine]) == 32 + 8 + 48 + len("svtabc123-") + 32, pod


def test_natural_order_takes_only_decimal_digits_as_numbers() -> None:
    assert sorted(["x1\u00b2", "x10", "x2"], key=natural_order) == ["x1\u00b2", "x2", "x10"]
    plan_networks(DEFAULT_VNI, [req("x1\u00b2"), req("x2")], DEVS)
