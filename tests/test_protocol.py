"""The handshake wire protocol: round trips, every rejection decode can give, and properties over bytes."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import random
import struct
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_svctunnel.netcodec import PodNetwork
from pytest_svctunnel.protocol import (
    HEADER_LEN,
    MAC_LEN,
    MAGIC,
    MAX_DATAGRAM,
    MAX_NETWORKS,
    VERSION,
    Ack,
    Body,
    Challenge,
    Confirm,
    Endpoint,
    Goodbye,
    Hello,
    Message,
    MsgType,
    ProtocolError,
    Reject,
    decode,
    encode,
    hello_size,
    peek_type,
    validate,
)
from pytest_svctunnel.values import ifname_problem

from .test_netcodec import V4_BASE, V6_BASE
from .test_netcodec import default_nets as default_list

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SESSION = b"\x01\x02\x03\x04\x05\x06\x07\x08"
NONCE = bytes(range(100, 116))

# The wire layout, written out independently of the module's struct definitions.
HELLO_HEAD = 2 + 4 + 1 + 1  # mtu, keepalive interval in ms, misses, number of runs
RUN_HEAD = (
    2 + 4 + 4 + (1 + 4 + 4) + (1 + 16 + 8) + 1
)  # count, vni, vni step, v4 plen/address/step, v6 the same, name len
SUFFIX_LEN = 2 + 1  # the first device's number, its digits
LARGEST_RUN = RUN_HEAD + 15 + SUFFIX_LEN
ENDPOINT_LEN = 1 + 16 + 2  # family, padded address, port
ACK_TAIL = 2 + 2  # mtu, networks built
RUN0 = HEADER_LEN + HELLO_HEAD  # the first run follows the hello's head
OFF_COUNT, OFF_VNI, OFF_VNI_STEP, OFF_PLEN4, OFF_ADDR4, OFF_STEP4 = 0, 2, 6, 10, 11, 15
OFF_PLEN6, OFF_ADDR6, OFF_STEP6, OFF_NAME_LEN, OFF_NAME = 19, 20, 36, 44, 45
ABSENT = 0xFF
RUN_FORMAT = "!HIIB4sIB16sQB"
HEADER_FORMAT = "!4sBBH8sQQ"
WIRE_MAX = 1200  # written out, not taken from the module: the largest datagram is 1200 bytes
FITTING = (WIRE_MAX - HEADER_LEN - HELLO_HEAD - MAC_LEN) // LARGEST_RUN  # networks of any kind that always fit

T = TypeVar("T")


def mac(data: bytes, key: bytes = KEY) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def resign(datagram: bytes, key: bytes = KEY) -> bytes:
    """Replace the MAC of ``datagram`` so that only later checks can reject it."""
    signed = datagram[:-MAC_LEN]
    return signed + mac(signed, key)


def raw_datagram(
    mtype: int, body: bytes, *, body_len: int | None = None, key: bytes = KEY, version: int = VERSION
) -> bytes:
    """A correctly signed datagram with any type and body bytes, built by hand."""
    length = len(body) if body_len is None else body_len
    header = struct.pack(HEADER_FORMAT, MAGIC, version, mtype, length, SESSION, 9, 1_700_000_000_000)
    return header + body + mac(header + body, key)


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def run_len(prefix: str) -> int:
    """The bytes of one run whose device names start with ``prefix``."""
    return RUN_HEAD + len(prefix) + SUFFIX_LEN


def net(i: int, *, v4: bool = True, v6: bool = True) -> PodNetwork:
    """Networks net(0), net(1), ... follow each other: VNI +1, name +1, IPv4 +256, IPv6 +65536."""
    return PodNetwork(
        vni=100 + i,
        dev=f"svt-x{i}",
        ipv4=ipaddress.IPv4Interface(f"10.40.{i}.1/30") if v4 else None,
        ipv6=ipaddress.IPv6Interface(f"fd00:40::{i:x}:1/126") if v6 else None,
    )


def default_nets(count: int, session: str = "abc123") -> tuple[PodNetwork, ...]:
    """A session's default numbering (``test_netcodec.default_nets``), as a hello carries it."""
    return tuple(default_list(count, session))


_RNG = random.Random(20240611)
_IRREGULAR_VNIS = _RNG.sample(range(1, 0xFFFFFF + 1), 18)
_IRREGULAR_V4 = _RNG.sample(range(2**24, 2**32 - 1), 18)
_IRREGULAR_V6 = [_RNG.randrange(2**120, 2**128) for _ in range(18)]


def irregular(i: int, *, name_len: int = 15) -> PodNetwork:
    """Networks that follow nothing: scattered VNIs and addresses, and names without a number at the end,
    so each one is a run of its own; with 15-character names, a run of the largest kind."""
    name = f"z{i:02d}-irregular-name"[:name_len]
    assert len(name) == name_len and not name[-1].isdigit()
    family = i % 3  # dual-stack, IPv4 only, IPv6 only
    return PodNetwork(
        _IRREGULAR_VNIS[i],
        name,
        ipaddress.IPv4Interface((_IRREGULAR_V4[i], 8 + i)) if family != 2 else None,
        ipaddress.IPv6Interface((_IRREGULAR_V6[i], 64 + i)) if family != 1 else None,
    )


def message(body: Body, *, session: bytes = SESSION, counter: int = 7, stamp: int = 1_700_000_000_123) -> Message:
    return Message(session, counter, stamp, body)


V4_END = Endpoint(ipaddress.IPv4Address("203.0.113.9"), 40123)
V6_END = Endpoint(ipaddress.IPv6Address("2001:db8::9"), 65535)
UNNUMBERED = (PodNetwork(7, "eth", None, None), PodNetwork(8, "vxlan-x", None, None))
FIVE_DIGITS = tuple(PodNetwork(50 + i, f"n{12345 + i}", None, None) for i in range(3))
EXACTLY_1200 = tuple(irregular(i) for i in range(12)) + tuple(irregular(i, name_len=14) for i in range(12, 18))

ROUND_TRIP = {
    "hello-1-network": message(Hello(1450, (net(0),))),
    "hello-10-networks-in-one-run": message(Hello(1450, tuple(net(i) for i in range(10)))),
    "hello-1024-default-networks": message(Hello(1500, default_nets(MAX_NETWORKS))),
    "hello-17-irregular-networks": message(Hello(1500, tuple(irregular(i) for i in range(FITTING)))),
    "hello-18-runs-of-exactly-1200-bytes": message(Hello(1500, EXACTLY_1200)),
    "hello-fast-keepalive": message(Hello(1450, (net(0),), keepalive_ms=250, misses=2)),
    "hello-ipv4-only": message(Hello(68, (net(1, v6=False),))),
    "hello-ipv6-only": message(Hello(65535, (net(2, v4=False),))),
    "hello-mixed-families": message(Hello(9000, (net(1, v6=False), net(2, v4=False), net(3)))),
    "hello-no-addresses": message(Hello(1400, (net(4, v4=False, v6=False),))),
    "hello-unnumbered-names": message(Hello(1400, UNNUMBERED)),
    "hello-5-digit-suffixes": message(Hello(1400, FIVE_DIGITS)),
    "challenge-ipv4": message(Challenge(NONCE, V4_END)),
    "challenge-ipv6": message(Challenge(NONCE, V6_END)),
    "confirm": message(Confirm(NONCE)),
    "ack-ipv4": message(Ack(V4_END, 1450, 1)),
    "ack-ipv6": message(Ack(V6_END, 68, 16)),
    "ack-built-0": message(Ack(V4_END, 1450, 0)),
    "ack-built-1024": message(Ack(V6_END, 65535, MAX_NETWORKS)),
    "goodbye": message(Goodbye()),
    "extreme-header-values": message(Confirm(bytes(16)), session=bytes(8), counter=2**64 - 1, stamp=0),
}

# The name prefixes of the runs each hello above packs into, worked out by hand.
HELLO_RUN_PREFIXES: dict[str, list[str]] = {
    "hello-1-network": ["svt-x"],
    "hello-10-networks-in-one-run": ["svt-x"],
    "hello-1024-default-networks": ["svtabc123-"],
    "hello-17-irregular-networks": [irregular(i).dev for i in range(FITTING)],  # 15 characters, no number
    "hello-18-runs-of-exactly-1200-bytes": [n.dev for n in EXACTLY_1200],  # 12 of 15 characters, 6 of 14
    "hello-fast-keepalive": ["svt-x"],
    "hello-ipv4-only": ["svt-x"],
    "hello-ipv6-only": ["svt-x"],
    "hello-mixed-families": ["svt-x"] * 3,
    "hello-no-addresses": ["svt-x"],
    "hello-unnumbered-names": ["eth", "vxlan-x"],
    "hello-5-digit-suffixes": ["n1"],  # numbered by the last four digits
}

EXPECTED_TYPE = {
    Hello: MsgType.HELLO,
    Challenge: MsgType.CHALLENGE,
    Confirm: MsgType.CONFIRM,
    Ack: MsgType.ACK,
    Goodbye: MsgType.GOODBYE,
}


def body_len(name: str, body: Body) -> int:
    if isinstance(body, Hello):
        return HELLO_HEAD + sum(run_len(prefix) for prefix in HELLO_RUN_PREFIXES[name])
    if isinstance(body, Challenge):
        return 16 + ENDPOINT_LEN
    if isinstance(body, Confirm):
        return 16
    if isinstance(body, Goodbye):
        return 0
    return ENDPOINT_LEN + ACK_TAIL


def reference_hello(body: bytes) -> tuple[tuple[int, int, int], list[PodNetwork], int]:
    """A hello body read by the layout as specified (not by the module): its (mtu, keepalive, misses),
    its networks expanded from the runs, and the number of runs."""
    mtu, keepalive_ms, misses, runs = struct.unpack_from("!HIBB", body)
    offset = HELLO_HEAD
    nets: list[PodNetwork] = []
    for _ in range(runs):
        count, vni, vni_step, plen4, addr4, step4, plen6, addr6, step6, name_len = struct.unpack_from(
            RUN_FORMAT, body, offset
        )
        offset += RUN_HEAD
        prefix = body[offset : offset + name_len].decode("ascii")
        number, width = struct.unpack_from("!HB", body, offset + name_len)
        offset += name_len + SUFFIX_LEN
        for i in range(count):
            v4 = int.from_bytes(addr4, "big") + i * step4
            v6 = int.from_bytes(addr6, "big") + i * step6
            nets.append(
                PodNetwork(
                    vni + i * vni_step,
                    prefix + str(number + i).zfill(width) if width else prefix,
                    None if plen4 == ABSENT else ipaddress.IPv4Interface((v4, plen4)),
                    None if plen6 == ABSENT else ipaddress.IPv6Interface((v6, plen6)),
                )
            )
    assert offset == len(body), "the runs end where the body ends"
    return (mtu, keepalive_ms, misses), nets, runs


@pytest.mark.parametrize("name", ROUND_TRIP.keys())
def test_round_trip(name: str) -> None:
    msg = ROUND_TRIP[name]
    datagram = encode(msg, KEY)
    assert len(datagram) == HEADER_LEN + body_len(name, msg.body) + MAC_LEN
    assert len(datagram) <= WIRE_MAX
    assert datagram[:4] == MAGIC and datagram[4] == 2 == VERSION
    assert datagram[5] == EXPECTED_TYPE[type(msg.body)]
    assert struct.unpack_from("!H", datagram, 6)[0] == body_len(name, msg.body)
    assert datagram[-MAC_LEN:] == mac(datagram[:-MAC_LEN])
    decoded = decode(datagram, KEY)
    assert decoded == msg
    assert decoded.type is EXPECTED_TYPE[type(msg.body)]
    assert peek_type(datagram) is decoded.type
    if isinstance(msg.body, Hello):
        head, nets, runs = reference_hello(datagram[HEADER_LEN:-MAC_LEN])
        assert head == (msg.body.mtu, msg.body.keepalive_ms, msg.body.misses)
        assert nets == list(msg.body.networks)
        assert runs == len(HELLO_RUN_PREFIXES[name])
        assert hello_size(msg.body.networks) == len(datagram)


def test_1024_default_networks_are_one_run_in_a_small_datagram() -> None:
    datagram = encode(ROUND_TRIP["hello-1024-default-networks"], KEY)
    assert len(datagram) == 32 + 8 + 45 + len("svtabc123-") + 3 + 32 == 130
    run = struct.unpack_from(RUN_FORMAT, datagram, RUN0)
    assert datagram[HEADER_LEN + 7] == 1  # one run
    assert run == (
        1024,
        333,
        1,
        30,
        ipaddress.IPv4Address("10.30.30.1").packed,
        4,
        126,
        ipaddress.IPv6Address("fd00:3030::1").packed,
        4,
        len("svtabc123-"),
    )
    assert datagram[RUN0 + OFF_NAME : RUN0 + OFF_NAME + 10] == b"svtabc123-"
    assert struct.unpack_from("!HB", datagram, RUN0 + OFF_NAME + 10) == (0, 1)


def test_17_irregular_networks_are_the_largest_datagram_kind() -> None:
    assert FITTING == 17
    datagram = encode(ROUND_TRIP["hello-17-irregular-networks"], KEY)
    assert len(datagram) == 32 + 8 + 17 * 63 + 32 == 1143
    assert datagram[HEADER_LEN + 7] == 17  # a run each, each of the largest kind


def test_an_18th_irregular_network_of_the_largest_kind_does_not_fit() -> None:
    msg = message(Hello(1500, tuple(irregular(i) for i in range(FITTING + 1))))
    validate(msg)  # every field is in range: only the size is refused
    with pytest.raises(ValueError, match=r"1206 bytes, more than 1200"):
        encode(msg, KEY)


def test_a_hello_of_exactly_1200_bytes_fits() -> None:
    assert len(encode(ROUND_TRIP["hello-18-runs-of-exactly-1200-bytes"], KEY)) == WIRE_MAX == MAX_DATAGRAM


def test_endpoint_str() -> None:
    assert str(V4_END) == "203.0.113.9:40123"
    assert str(V6_END) == "[2001:db8::9]:65535"


# -- every rejection decode can give -------------------------------------------------------------------------------

HELLO = encode(ROUND_TRIP["hello-1-network"], KEY)
HELLO1200 = encode(ROUND_TRIP["hello-18-runs-of-exactly-1200-bytes"], KEY)
CHALLENGE = encode(ROUND_TRIP["challenge-ipv4"], KEY)
CONFIRM = encode(ROUND_TRIP["confirm"], KEY)
ACK = encode(ROUND_TRIP["ack-ipv4"], KEY)
ACK6 = encode(ROUND_TRIP["ack-ipv6"], KEY)


def run_bytes(
    *,
    count: int = 1,
    vni: int = 100,
    vni_step: int = 0,
    v4: str | None = None,
    step4: int = 0,
    v6: str | None = None,
    step6: int = 0,
    prefix: bytes = b"eth",
    number: int = 0,
    width: int = 0,
    plen4: int | None = None,
    plen6: int | None = None,
    name_len: int | None = None,
    suffix: bool = True,
) -> bytes:
    """One run as the layout says, built by hand; ``plen4``/``plen6``/``name_len`` override what the rest implies."""
    i4 = ipaddress.IPv4Interface(v4) if v4 else None
    i6 = ipaddress.IPv6Interface(v6) if v6 else None
    head = struct.pack(
        RUN_FORMAT,
        count,
        vni,
        vni_step,
        plen4 if plen4 is not None else i4.network.prefixlen if i4 else ABSENT,
        i4.ip.packed if i4 else bytes(4),
        step4,
        plen6 if plen6 is not None else i6.network.prefixlen if i6 else ABSENT,
        i6.ip.packed if i6 else bytes(16),
        step6,
        len(prefix) if name_len is None else name_len,
    )
    return head + prefix + (struct.pack("!HB", number, width) if suffix else b"")


def hello_raw(
    *runs: bytes,
    mtu: int = 1450,
    keepalive_ms: int = 5000,
    misses: int = 3,
    nruns: int | None = None,
    extra: bytes = b"",
    version: int = VERSION,
) -> bytes:
    """A signed hello built by hand, so that validate() cannot stop what the test wants on the wire."""
    head = struct.pack("!HIBB", mtu, keepalive_ms, misses, len(runs) if nruns is None else nruns)
    return raw_datagram(MsgType.HELLO, head + b"".join(runs) + extra, version=version)


def numbered(**fields: object) -> bytes:
    """A run of three numbered dual-stack networks (eth9, eth10, eth11) with some fields replaced."""
    base: dict[str, object] = dict(
        count=3, vni=100, vni_step=1, v4="10.0.0.1/30", step4=4, v6="fd00::1/126", step6=4, number=9, width=1
    )
    return run_bytes(**{**base, **fields})  # type: ignore[arg-type]


DEFAULT_RUN = dict(
    count=1024, vni=333, vni_step=1, v4="10.30.30.1/30", step4=4, v6="fd00:3030::1/126", step6=4, prefix=b"svtabc123-"
)


def default_run(*, start: int = 0, **fields: object) -> bytes:
    """The run of 1024 default networks, or of those from the ``start``-th on, with some fields replaced."""
    first = {
        "vni": 333 + start,
        "v4": str(ipaddress.IPv4Interface((V4_BASE + 4 * start, 30))),
        "v6": str(ipaddress.IPv6Interface((V6_BASE + 4 * start, 126))),
        "number": start,
        "width": 1,
    }
    return run_bytes(**{**DEFAULT_RUN, **first, **fields})  # type: ignore[arg-type]


def endpoint_bytes(family: int, address: bytes, port: int = 4000) -> bytes:
    return struct.pack("!B16sH", family, address.ljust(16, b"\0"), port)


def old_v1_hello() -> bytes:
    """A hello as version 1 wrote it: mtu, count, 42-byte network records, keepalive and misses."""
    record = struct.pack("!IB4sB16s16s", 100, ABSENT, bytes(4), ABSENT, bytes(16), b"eth0".ljust(16, b"\0"))
    return raw_datagram(MsgType.HELLO, struct.pack("!HB", 1450, 1) + record + struct.pack("!IB", 5000, 3), version=1)


# Hand-built datagrams that decode: the same helpers as the rejections below, at the edges of what is allowed.
GOOD_RAW: dict[str, tuple[bytes, list[PodNetwork]]] = {
    "numbered-run": (
        hello_raw(numbered()),
        [
            PodNetwork(
                100 + i,
                f"eth{9 + i}",
                ipaddress.IPv4Interface(f"10.0.0.{1 + 4 * i}/30"),
                ipaddress.IPv6Interface(f"fd00::{1 + 4 * i:x}/126"),
            )
            for i in range(3)
        ],
    ),
    "unnumbered-single": (hello_raw(run_bytes(prefix=b"eth0")), [PodNetwork(100, "eth0", None, None)]),
    "zero-padded": (
        hello_raw(run_bytes(count=2, vni_step=5, prefix=b"n", number=7, width=3)),
        [PodNetwork(100, "n007", None, None), PodNetwork(105, "n008", None, None)],
    ),
    "number-past-its-width": (
        hello_raw(run_bytes(count=2, vni_step=1, prefix=b"n", number=65535, width=4)),
        [PodNetwork(100, "n65535", None, None), PodNetwork(101, "n65536", None, None)],
    ),
    "1024-networks-in-two-runs": (
        hello_raw(default_run(count=1000), default_run(start=1000, count=24)),
        list(default_nets(1024)),
    ),
    "name-of-15-characters-at-the-end": (
        hello_raw(run_bytes(count=2, vni_step=1, prefix=b"abcdefghijklm", number=98, width=2)),
        [PodNetwork(100, "abcdefghijklm98", None, None), PodNetwork(101, "abcdefghijklm99", None, None)],
    ),
    "unnumbered-name-of-15": (
        hello_raw(run_bytes(prefix=b"abcdefghijklmno")),
        [PodNetwork(100, "abcdefghijklmno", None, None)],
    ),
    "vni-up-to-2**24-1": (
        hello_raw(run_bytes(count=2, vni=0xFFFFFE, vni_step=1, prefix=b"v", width=1)),
        [PodNetwork(0xFFFFFE, "v0", None, None), PodNetwork(0xFFFFFF, "v1", None, None)],
    ),
    "addresses-up-to-the-top": (
        hello_raw(
            run_bytes(count=2, vni_step=1, v4="255.255.255.251/30", step4=4, v6="ffff::/16", step6=2**64 - 1, width=1)
        ),
        [
            PodNetwork(
                100 + i,
                f"eth{i}",
                ipaddress.IPv4Interface(f"255.255.255.{251 + 4 * i}/30"),
                ipaddress.IPv6Interface((int(ipaddress.IPv6Address("ffff::")) + i * (2**64 - 1), 16)),
            )
            for i in range(2)
        ],
    ),
    "prefix-lengths-0": (
        hello_raw(run_bytes(v4="10.0.0.1/0", v6="fd00::1/0")),
        [PodNetwork(100, "eth", ipaddress.IPv4Interface("10.0.0.1/0"), ipaddress.IPv6Interface("fd00::1/0"))],
    ),
    "prefix-lengths-32-128": (
        hello_raw(run_bytes(v4="10.0.0.1/32", v6="fd00::1/128")),
        [PodNetwork(100, "eth", ipaddress.IPv4Interface("10.0.0.1/32"), ipaddress.IPv6Interface("fd00::1/128"))],
    ),
}


@pytest.mark.parametrize(("datagram", "nets"), GOOD_RAW.values(), ids=GOOD_RAW.keys())
def test_hand_built_hellos_decode(datagram: bytes, nets: list[PodNetwork]) -> None:
    """The helpers that build the rejections below make valid hellos: each rejection is its one changed field."""
    body = decode(datagram, KEY).body
    assert isinstance(body, Hello)
    assert list(body.networks) == nets
    assert reference_hello(datagram[HEADER_LEN:-MAC_LEN])[1] == nets


BAD_DATAGRAMS: dict[str, tuple[bytes, Reject]] = {
    # size
    "empty": (b"", Reject.TRUNCATED),
    "header-only": (HELLO[:HEADER_LEN], Reject.TRUNCATED),
    "one-byte-short-of-header-and-mac": (CONFIRM[: HEADER_LEN + MAC_LEN - 1], Reject.TRUNCATED),
    "one-byte-over-maximum": (HELLO1200 + b"\0", Reject.OVERSIZED),
    "one-byte-over-maximum-with-its-length-and-mac": (
        resign(patch(HELLO1200 + b"\0", 6, struct.pack("!H", WIRE_MAX + 1 - HEADER_LEN - MAC_LEN))),
        Reject.OVERSIZED,
    ),
    "huge": (bytes(65507), Reject.OVERSIZED),
    # header fields, checked before the MAC
    "bad-magic": (patch(HELLO, 0, b"SVTX"), Reject.MAGIC),
    "magic-lowercase": (patch(HELLO, 0, b"svtn"), Reject.MAGIC),
    "version-0": (patch(HELLO, 4, b"\x00"), Reject.VERSION),
    "version-1": (patch(HELLO, 4, b"\x01"), Reject.VERSION),
    "version-1-resigned": (resign(patch(HELLO, 4, b"\x01")), Reject.VERSION),
    "version-1-hello-of-an-old-client": (old_v1_hello(), Reject.VERSION),
    "version-1-ack-of-an-old-agent": (
        raw_datagram(MsgType.ACK, endpoint_bytes(4, b"\1\2\3\4") + struct.pack("!HB", 1450, 1), version=1),
        Reject.VERSION,
    ),
    "version-3": (resign(patch(HELLO, 4, b"\x03")), Reject.VERSION),
    "type-0": (patch(HELLO, 5, b"\x00"), Reject.TYPE),
    "type-6": (patch(HELLO, 5, b"\x06"), Reject.TYPE),
    "type-255-resigned": (resign(patch(CONFIRM, 5, b"\xff")), Reject.TYPE),
    "body-length-plus-1": (patch(HELLO, 6, struct.pack("!H", len(HELLO) - HEADER_LEN - MAC_LEN + 1)), Reject.LENGTH),
    "body-length-minus-1": (patch(ACK, 6, struct.pack("!H", ENDPOINT_LEN + ACK_TAIL - 1)), Reject.LENGTH),
    "trailing-byte": (CONFIRM + b"\0", Reject.LENGTH),
    "mac-cut-short": (CONFIRM[:-1], Reject.LENGTH),
    "body-length-0xffff": (patch(CONFIRM, 6, b"\xff\xff"), Reject.LENGTH),
    # authentication
    "last-mac-byte-flipped": (CONFIRM[:-1] + bytes([CONFIRM[-1] ^ 1]), Reject.MAC),
    "mac-zeroed": (CONFIRM[:-MAC_LEN] + bytes(MAC_LEN), Reject.MAC),
    "signed-with-other-key": (resign(HELLO, OTHER_KEY), Reject.MAC),
    "counter-changed": (patch(HELLO, 16, b"\x99"), Reject.MAC),
    "body-changed": (patch(CHALLENGE, HEADER_LEN, b"\x00"), Reject.MAC),
    "run-count-changed": (patch(HELLO, RUN0 + OFF_COUNT, b"\x00\x02"), Reject.MAC),
    "type-swapped-same-length": (patch(CONFIRM, 5, bytes([MsgType.HELLO])), Reject.MAC),
    # bodies that pass the MAC but do not parse: the hello's head
    "hello-body-empty": (raw_datagram(MsgType.HELLO, b""), Reject.BODY),
    "hello-body-2-bytes": (raw_datagram(MsgType.HELLO, b"\x05\xdc"), Reject.BODY),
    "hello-body-7-bytes": (raw_datagram(MsgType.HELLO, struct.pack("!HIB", 1450, 5000, 3)), Reject.BODY),
    "hello-zero-runs": (hello_raw(), Reject.BODY),
    "hello-zero-runs-before-a-run": (hello_raw(numbered(), nruns=0), Reject.BODY),
    "hello-2-runs-with-1-run": (hello_raw(numbered(), nruns=2), Reject.BODY),
    "hello-1-run-with-2-runs": (hello_raw(numbered(), numbered(vni=200, prefix=b"x")[:-1], nruns=1), Reject.BODY),
    "hello-trailing-byte-after-the-runs": (hello_raw(numbered(), extra=b"\0"), Reject.BODY),
    "hello-255-runs-with-1-run": (hello_raw(numbered(), nruns=255), Reject.BODY),
    "hello-mtu-10": (hello_raw(numbered(), mtu=10), Reject.BODY),
    "hello-mtu-67": (hello_raw(numbered(), mtu=67), Reject.BODY),
    "hello-keepalive-9ms": (hello_raw(numbered(), keepalive_ms=9), Reject.BODY),
    "hello-keepalive-3600001ms": (hello_raw(numbered(), keepalive_ms=3_600_001), Reject.BODY),
    "hello-misses-0": (hello_raw(numbered(), misses=0), Reject.BODY),
    "hello-misses-101": (hello_raw(numbered(), misses=101), Reject.BODY),
    # a run's own fields
    "run-count-0": (hello_raw(numbered(count=0)), Reject.BODY),
    "run-name-length-16": (hello_raw(run_bytes(prefix=b"abcdefghijklmnop")), Reject.BODY),
    "run-name-length-255": (hello_raw(run_bytes(prefix=b"a" * 255)), Reject.BODY),
    "run-of-2-with-vni-step-0": (hello_raw(numbered(count=2, vni_step=0)), Reject.BODY),
    "run-of-1024-with-vni-step-0": (hello_raw(default_run(vni_step=0)), Reject.BODY),
    "run-of-2-with-width-0": (hello_raw(numbered(count=2, width=0)), Reject.BODY),
    "run-width-5": (hello_raw(run_bytes(prefix=b"n", number=1, width=5)), Reject.BODY),
    "run-width-255": (hello_raw(run_bytes(prefix=b"n", number=1, width=255)), Reject.BODY),
    "run-name-cut-short": (hello_raw(run_bytes(prefix=b"eth", name_len=10, suffix=False)), Reject.BODY),
    "run-name-length-past-the-end": (hello_raw(run_bytes(prefix=b"eth", name_len=15)), Reject.BODY),
    "run-suffix-cut-short": (hello_raw(run_bytes(suffix=False) + b"\0\0"), Reject.BODY),
    "run-head-cut-short": (hello_raw(numbered()[: RUN_HEAD - 1]), Reject.BODY),
    "second-run-cut-short": (hello_raw(numbered(), numbered(vni=200, prefix=b"x")[:-1]), Reject.BODY),
    # too many networks
    "1025-networks-in-one-run": (hello_raw(default_run(count=1025)), Reject.BODY),
    "1025-networks-in-two-runs": (
        hello_raw(default_run(count=1000), default_run(start=1000, count=25)),
        Reject.BODY,
    ),
    "65535-networks-in-one-run": (hello_raw(default_run(count=0xFFFF)), Reject.BODY),
    # VNIs
    "vni-0": (hello_raw(run_bytes(vni=0)), Reject.BODY),
    "vni-2**24": (hello_raw(run_bytes(vni=2**24)), Reject.BODY),
    "vni-2**32-1": (hello_raw(run_bytes(vni=2**32 - 1)), Reject.BODY),
    "vni-grows-past-2**24-1": (hello_raw(numbered(count=2, vni=0xFFFFFF)), Reject.BODY),
    "vni-step-2**32-1": (hello_raw(numbered(count=2, vni=1, vni_step=2**32 - 1)), Reject.BODY),
    "vni-of-the-1024th-past-2**24-1": (hello_raw(default_run(vni=0xFFFFFF - 1022)), Reject.BODY),
    # device names, as the runs expand them
    "dev-empty": (hello_raw(run_bytes(prefix=b"")), Reject.BODY),
    "dev-16-characters-with-its-number": (hello_raw(run_bytes(prefix=b"abcdefghijklmno", width=1)), Reject.BODY),
    "dev-grows-to-16-characters": (
        hello_raw(run_bytes(count=2, vni_step=1, prefix=b"abcdefghijklmn", number=9, width=1)),
        Reject.BODY,
    ),
    "dev-slash": (hello_raw(run_bytes(prefix=b"eth/")), Reject.BODY),
    "dev-colon": (hello_raw(run_bytes(prefix=b"eth0:", number=1, width=1)), Reject.BODY),
    "dev-percent": (hello_raw(run_bytes(prefix=b"eth%d")), Reject.BODY),
    "dev-space": (hello_raw(run_bytes(prefix=b"eth ", width=1)), Reject.BODY),
    "dev-dot": (hello_raw(run_bytes(prefix=b".")), Reject.BODY),
    "dev-dotdot": (hello_raw(run_bytes(prefix=b"..")), Reject.BODY),
    "dev-leading-nul": (hello_raw(run_bytes(prefix=b"\0eth")), Reject.BODY),
    "dev-embedded-nul": (hello_raw(run_bytes(prefix=b"et\0h")), Reject.BODY),
    "dev-control-char": (hello_raw(run_bytes(prefix=b"eth\x07")), Reject.BODY),
    "dev-not-ascii": (hello_raw(run_bytes(prefix=b"eth\xff")), Reject.BODY),
    "dev-bad-in-second-run": (hello_raw(numbered(), run_bytes(vni=200, prefix=b"a b")), Reject.BODY),
    # duplicates among all the networks the runs expand to
    "duplicate-vni-in-two-runs": (hello_raw(numbered(), run_bytes(vni=102, prefix=b"other")), Reject.BODY),
    "duplicate-dev-in-two-runs": (hello_raw(numbered(), run_bytes(vni=999, prefix=b"eth10")), Reject.BODY),
    "duplicate-dev-numbered-in-two-runs": (
        hello_raw(numbered(), run_bytes(vni=999, prefix=b"eth", number=11, width=1)),
        Reject.BODY,
    ),
    "duplicate-vni-inside-1024": (
        hello_raw(default_run(count=1000), default_run(count=1, vni=333 + 999, prefix=b"x", width=0)),
        Reject.BODY,
    ),
    "duplicate-dev-inside-1024": (
        hello_raw(default_run(count=1000), default_run(count=1, vni=5000, number=500)),
        Reject.BODY,
    ),
    # addresses
    "ipv4-grows-past-the-top": (hello_raw(numbered(count=2, v4="255.255.255.253/30")), Reject.BODY),
    "ipv4-step-past-the-top": (hello_raw(numbered(count=2, v4="0.0.0.2/30", step4=2**32 - 1)), Reject.BODY),
    "ipv4-of-the-1024th-past-the-top": (hello_raw(default_run(v4="255.255.240.9/30")), Reject.BODY),
    "ipv6-grows-past-the-top": (
        hello_raw(numbered(count=2, v6="ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffd/126")),
        Reject.BODY,
    ),
    "ipv6-step-past-the-top": (
        hello_raw(numbered(count=2, v6="ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120", step6=2**64 - 1)),
        Reject.BODY,
    ),
    "ipv4-prefix-33": (hello_raw(numbered(plen4=33)), Reject.BODY),
    "ipv4-prefix-254": (hello_raw(numbered(plen4=254)), Reject.BODY),
    "ipv6-prefix-129": (hello_raw(numbered(plen6=129)), Reject.BODY),
    "ipv6-prefix-254": (hello_raw(numbered(plen6=254)), Reject.BODY),
    # the other bodies
    "challenge-body-short": (raw_datagram(MsgType.CHALLENGE, NONCE + endpoint_bytes(4, b"\1\2\3\4")[:-1]), Reject.BODY),
    "challenge-body-long": (
        raw_datagram(MsgType.CHALLENGE, NONCE + endpoint_bytes(4, b"\1\2\3\4") + b"\0"),
        Reject.BODY,
    ),
    "challenge-family-0": (raw_datagram(MsgType.CHALLENGE, NONCE + endpoint_bytes(0, b"\1\2\3\4")), Reject.BODY),
    "challenge-family-5": (raw_datagram(MsgType.CHALLENGE, NONCE + endpoint_bytes(5, b"\1\2\3\4")), Reject.BODY),
    "challenge-ipv4-padding-not-zero": (
        raw_datagram(MsgType.CHALLENGE, NONCE + endpoint_bytes(4, b"\1\2\3\4" + b"\0" * 11 + b"\1")),
        Reject.BODY,
    ),
    "confirm-nonce-15": (raw_datagram(MsgType.CONFIRM, NONCE[:15]), Reject.BODY),
    "confirm-nonce-17": (raw_datagram(MsgType.CONFIRM, NONCE + b"\0"), Reject.BODY),
    "goodbye-with-a-body": (raw_datagram(MsgType.GOODBYE, b"\0"), Reject.BODY),
    "confirm-empty-body": (raw_datagram(MsgType.CONFIRM, b""), Reject.BODY),
    "ack-body-short": (raw_datagram(MsgType.ACK, endpoint_bytes(6, bytes(16)) + b"\x05\xdc"), Reject.BODY),
    "ack-with-the-old-3-byte-tail": (
        raw_datagram(MsgType.ACK, endpoint_bytes(4, b"\1\2\3\4") + struct.pack("!HB", 1450, 1)),
        Reject.BODY,
    ),
    "ack-body-long": (
        raw_datagram(MsgType.ACK, endpoint_bytes(4, b"\1\2\3\4") + struct.pack("!HH", 1450, 1) + b"\0"),
        Reject.BODY,
    ),
    "ack-mtu-67": (resign(patch(ACK, HEADER_LEN + ENDPOINT_LEN, struct.pack("!H", 67))), Reject.BODY),
    "ack-family-6-as-4": (resign(patch(ACK6, HEADER_LEN, b"\x04")), Reject.BODY),
    "ack-family-255": (resign(patch(ACK, HEADER_LEN, b"\xff")), Reject.BODY),
    "ack-built-1025": (resign(patch(ACK, HEADER_LEN + ENDPOINT_LEN + 2, struct.pack("!H", 1025))), Reject.BODY),
    "ack-built-65535": (resign(patch(ACK, HEADER_LEN + ENDPOINT_LEN + 2, b"\xff\xff")), Reject.BODY),
}


@pytest.mark.parametrize(("datagram", "reason"), BAD_DATAGRAMS.values(), ids=BAD_DATAGRAMS.keys())
def test_decode_rejects(datagram: bytes, reason: Reject) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(datagram, KEY)
    assert info.value.reason is reason
    assert str(info.value).startswith(reason.value)


def test_body_rejections_are_past_the_mac_check() -> None:
    """The BODY cases above are signed: the same bytes with their MAC broken are refused as MAC."""
    cases = [name for name, (_, reason) in BAD_DATAGRAMS.items() if reason is Reject.BODY]
    assert len(cases) > 80
    for name in cases:
        with pytest.raises(ProtocolError) as info:
            decode(BAD_DATAGRAMS[name][0], OTHER_KEY)
        assert info.value.reason is Reject.MAC, name


def test_an_ack_of_1024_built_is_accepted_and_1025_is_not() -> None:
    """The edge of the built field, on the same signed bytes."""
    ack = encode(ROUND_TRIP["ack-built-1024"], KEY)
    assert struct.unpack_from("!HH", ack, HEADER_LEN + ENDPOINT_LEN) == (65535, 1024)
    decoded = decode(ack, KEY).body
    assert isinstance(decoded, Ack) and decoded.built == 1024
    with pytest.raises(ProtocolError) as info:
        decode(resign(patch(ack, HEADER_LEN + ENDPOINT_LEN + 2, struct.pack("!H", 1025))), KEY)
    assert info.value.reason is Reject.BODY


@pytest.mark.parametrize("msg", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_wrong_key_is_rejected_as_mac(msg: Message) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(encode(msg, KEY), OTHER_KEY)
    assert info.value.reason is Reject.MAC


@pytest.mark.parametrize("msg", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_every_single_bit_flip_is_a_protocol_error(msg: Message) -> None:
    datagram = encode(msg, KEY)
    for bit in range(len(datagram) * 8):
        flipped = bytearray(datagram)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(ProtocolError):
            decode(bytes(flipped), KEY)


def test_protocol_error_is_a_value_error_with_reason() -> None:
    err = ProtocolError(Reject.BODY, "vni 0")
    assert isinstance(err, ValueError)
    assert err.reason is Reject.BODY
    assert str(err) == "bad-body: vni 0"
    assert str(ProtocolError(Reject.MAC)) == "bad-mac"


# -- validate() and encode() refuse what cannot go on the wire ---------------------------------------------------

BAD_MESSAGES: dict[str, Message] = {
    "session-7-bytes": message(Confirm(NONCE), session=b"1234567"),
    "session-9-bytes": message(Confirm(NONCE), session=b"123456789"),
    "session-empty": message(Confirm(NONCE), session=b""),
    "counter-negative": message(Confirm(NONCE), counter=-1),
    "counter-2**64": message(Confirm(NONCE), counter=2**64),
    "timestamp-negative": message(Confirm(NONCE), stamp=-1),
    "timestamp-2**64": message(Confirm(NONCE), stamp=2**64),
    "hello-no-networks": message(Hello(1450, ())),
    "hello-1025-networks": message(Hello(1450, default_nets(MAX_NETWORKS + 1))),
    "hello-duplicate-vni": message(Hello(1450, (net(0), PodNetwork(100, "other", None, None)))),
    "hello-duplicate-dev": message(Hello(1450, (net(0), PodNetwork(999, "svt-x0", None, None)))),
    "hello-keepalive-9ms": message(Hello(1450, (net(0),), keepalive_ms=9)),
    "hello-misses-0": message(Hello(1450, (net(0),), misses=0)),
    "hello-misses-101": message(Hello(1450, (net(0),), misses=101)),
    "vni-0": message(Hello(1450, (PodNetwork(0, "eth0", None, None),))),
    "vni-2**24": message(Hello(1450, (PodNetwork(2**24, "eth0", None, None),))),
    "vni-negative": message(Hello(1450, (PodNetwork(-1, "eth0", None, None),))),
    "dev-empty": message(Hello(1450, (PodNetwork(5, "", None, None),))),
    "dev-16-chars": message(Hello(1450, (PodNetwork(5, "a" * 16, None, None),))),
    "dev-slash": message(Hello(1450, (PodNetwork(5, "a/b", None, None),))),
    "dev-non-ascii": message(Hello(1450, (PodNetwork(5, "ethé", None, None),))),
    "dev-non-ascii-digit": message(Hello(1450, (PodNetwork(5, "eth٣", None, None),))),
    "dev-bad-in-second-network": message(Hello(1450, (net(0), PodNetwork(5, "a b", None, None)))),
    "challenge-nonce-15": message(Challenge(NONCE[:15], V4_END)),
    "challenge-nonce-17": message(Challenge(NONCE + b"\0", V4_END)),
    "confirm-nonce-0": message(Confirm(b"")),
    "confirm-nonce-32": message(Confirm(NONCE * 2)),
    "hello-mtu-67": message(Hello(67, (net(0),))),
    "hello-mtu-0": message(Hello(0, (net(0),))),
    "hello-mtu-65536": message(Hello(65536, (net(0),))),
    "ack-mtu-67": message(Ack(V4_END, 67, 1)),
    "ack-mtu-65536": message(Ack(V4_END, 65536, 1)),
    "ack-built-1025": message(Ack(V4_END, 1450, MAX_NETWORKS + 1)),
    "ack-built-65536": message(Ack(V4_END, 1450, 65536)),
    "ack-built-negative": message(Ack(V4_END, 1450, -1)),
}


@pytest.mark.parametrize("msg", BAD_MESSAGES.values(), ids=BAD_MESSAGES.keys())
def test_validate_and_encode_raise_value_error(msg: Message) -> None:
    with pytest.raises(ValueError):
        validate(msg)
    with pytest.raises(ValueError):
        encode(msg, KEY)


UNREPRESENTABLE: dict[str, Message] = {
    "ack-port-70000": message(Ack(Endpoint(ipaddress.IPv4Address("192.0.2.1"), 70000), 1450, 1)),
    "challenge-port-negative": message(Challenge(NONCE, Endpoint(ipaddress.IPv4Address("192.0.2.1"), -1))),
    "ack-built-1025": message(Ack(V4_END, 1450, MAX_NETWORKS + 1)),
    "ack-built-65536": message(Ack(V4_END, 1450, 65536)),
    "ack-built-negative": message(Ack(V4_END, 1450, -1)),
    "hello-18-irregular-networks": message(Hello(1450, tuple(irregular(i) for i in range(18)))),
}


@pytest.mark.parametrize("msg", UNREPRESENTABLE.values(), ids=UNREPRESENTABLE.keys())
def test_encode_refuses_unrepresentable_fields_with_value_error(msg: Message) -> None:
    """encode() promises ValueError on out-of-range fields, not struct.error."""
    with pytest.raises(ValueError):
        encode(msg, KEY)


@pytest.mark.parametrize("msg", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_validate_accepts_valid_messages(msg: Message) -> None:
    validate(msg)


# -- edges of the run encoding ------------------------------------------------------------------------------------


def test_an_ipv6_step_past_64_bits_splits_the_run() -> None:
    """Networks that follow each other except that their IPv6 /64s are a /64 apart (as plan_networks makes of
    ipv6="fd00:1::/64" and "fd00:2::/64"): they cannot be one run (the step field has 64 bits), so two runs."""
    nets = (
        PodNetwork(
            334, "svtabc123-1", ipaddress.IPv4Interface("10.30.30.5/30"), ipaddress.IPv6Interface("fd00:1::1/64")
        ),
        PodNetwork(
            335, "svtabc123-2", ipaddress.IPv4Interface("10.30.30.9/30"), ipaddress.IPv6Interface("fd00:2::1/64")
        ),
    )
    msg = message(Hello(1450, nets))
    assert decode(encode(msg, KEY), KEY) == msg


@pytest.mark.parametrize("ipv6", ["::1/32", "::/0"])
def test_ipv6_below_2_to_32_with_short_prefix_round_trips(ipv6: str) -> None:
    msg = message(Hello(1450, (PodNetwork(5, "eth0", None, ipaddress.IPv6Interface(ipv6)),)))
    datagram = encode(msg, KEY)
    assert decode(datagram, KEY) == msg  # an IPv6 address stays one, however small


def test_a_hello_of_256_runs_is_refused_with_value_error() -> None:
    nets = tuple(PodNetwork(1 + i, f"eth-{i}-x", None, None) for i in range(256))
    with pytest.raises(ValueError, match="more than 1200"):
        encode(message(Hello(1450, nets)), KEY)


# -- peek_type ------------------------------------------------------------------------------------------------

PEEK: dict[str, tuple[bytes, MsgType | None]] = {
    "hello": (HELLO, MsgType.HELLO),
    "challenge": (CHALLENGE, MsgType.CHALLENGE),
    "confirm": (CONFIRM, MsgType.CONFIRM),
    "ack": (ACK, MsgType.ACK),
    "unauthenticated-header-only": (CHALLENGE[:HEADER_LEN], MsgType.CHALLENGE),
    "bad-mac-still-routed": (resign(HELLO, OTHER_KEY), MsgType.HELLO),
    "empty": (b"", None),
    "one-byte-short": (CHALLENGE[: HEADER_LEN - 1], None),
    "magic-only": (MAGIC, None),
    "bad-magic": (patch(HELLO, 0, b"XVTN"), None),
    "type-0": (patch(HELLO, 5, b"\x00"), None),
    "type-6": (patch(HELLO, 5, b"\x06"), None),
    "zeros": (bytes(80), None),
}


@pytest.mark.parametrize(("datagram", "expected"), PEEK.values(), ids=PEEK.keys())
def test_peek_type(datagram: bytes, expected: MsgType | None) -> None:
    assert peek_type(datagram) is expected


# -- properties --------------------------------------------------------------------------------------------------

dev_names = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/:%"), min_size=1, max_size=15
).filter(lambda s: s not in (".", ".."))
vnis = st.integers(1, 0xFFFFFF)
ipv4_ifaces = st.builds(ipaddress.IPv4Interface, st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 32)))
ipv6_ifaces = st.builds(
    ipaddress.IPv6Interface,
    st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)),
)
pod_networks = st.builds(
    PodNetwork, vni=vnis, dev=dev_names, ipv4=st.none() | ipv4_ifaces, ipv6=st.none() | ipv6_ifaces
)
addresses = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)) | st.builds(
    ipaddress.IPv6Address, st.integers(0, 2**128 - 1)
)
endpoints = st.builds(Endpoint, addresses, st.integers(0, 65535))
mtus = st.integers(68, 65535)
nonces = st.binary(min_size=16, max_size=16)
# Networks of any kind, as many as always fit (a run each in the worst case).
hellos = st.builds(
    Hello,
    mtus,
    st.lists(pod_networks, min_size=1, max_size=FITTING, unique_by=(lambda n: n.vni, lambda n: n.dev)).map(tuple),
    st.integers(10, 3_600_000),
    st.integers(1, 100),
)
PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_."


@st.composite
def regular_runs(draw: st.DrawFn) -> list[tuple[str, list[PodNetwork]]]:
    """A few runs of networks that follow each other (random lengths and positive steps, names with a number at
    the end), up to MAX_NETWORKS in all; each run's name prefix, with which no other run's names can clash."""
    nruns = draw(st.integers(1, 4), label="runs")
    total = draw(st.integers(nruns, MAX_NETWORKS), label="networks")
    cuts = sorted(draw(st.sets(st.integers(1, total - 1), min_size=nruns - 1, max_size=nruns - 1))) if nruns > 1 else []
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, total], strict=True)]
    runs = []
    for k, count in enumerate(counts):
        # distinct prefixes that end in a letter: no name of one run can be a name of another
        prefix = draw(st.text(alphabet=PREFIX_ALPHABET, max_size=9)) + "abcd"[k] + "-"
        width = draw(st.integers(1, 4))
        number = draw(st.integers(0, 10**4 - count))
        lo, hi = k * 2**22 + 1, min((k + 1) * 2**22, 0xFFFFFF)  # each run's VNIs in a quarter of their own
        vni_step = draw(st.integers(1, (hi - lo) // max(1, count - 1)))
        vni = draw(st.integers(lo, hi - (count - 1) * vni_step))
        v4 = v6 = None
        if draw(st.booleans()):
            step4 = draw(st.integers(1, (2**32 - 1) // max(1, count - 1)))
            first4 = draw(st.integers(0, 2**32 - 1 - (count - 1) * step4))
            v4 = (first4, step4, draw(st.integers(0, 32)))
        if draw(st.booleans()):
            plen6 = draw(st.integers(0, 128))
            step6 = draw(st.integers(1, min(2**64 - 1, (2**128 - 1 - 2**32) // max(1, count - 1))))
            first6 = draw(st.integers(0, 2**128 - 1 - (count - 1) * step6))
            v6 = (first6, step6, plen6)
        nets = [
            PodNetwork(
                vni + i * vni_step,
                prefix + str(number + i).zfill(width),
                ipaddress.IPv4Interface((v4[0] + i * v4[1], v4[2])) if v4 else None,
                ipaddress.IPv6Interface((v6[0] + i * v6[1], v6[2])) if v6 else None,
            )
            for i in range(count)
        ]
        runs.append((prefix, nets))
    return runs


regular_hellos = st.builds(
    lambda mtu, runs: Hello(mtu, tuple(n for _, nets in runs for n in nets)), mtus, regular_runs()
)
any_hellos = hellos | regular_hellos
bodies: st.SearchStrategy[Body] = st.one_of(
    hellos,
    regular_hellos,
    st.builds(Challenge, nonces, endpoints),
    st.builds(Confirm, nonces),
    st.builds(Ack, endpoints, mtus, st.integers(0, MAX_NETWORKS)),
    st.just(Goodbye()),
)
messages = st.builds(
    Message,
    session=st.binary(min_size=8, max_size=8),
    counter=st.integers(0, 2**64 - 1),
    timestamp_ms=st.integers(0, 2**64 - 1),
    body=bodies,
)
keys = st.binary(min_size=0, max_size=64)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(messages, keys)
def test_property_round_trip(msg: Message, key: bytes) -> None:
    datagram = encode(msg, key)
    assert len(datagram) <= WIRE_MAX
    assert decode(datagram, key) == msg
    assert peek_type(datagram) is msg.type
    if isinstance(msg.body, Hello):
        head, nets, runs = reference_hello(datagram[HEADER_LEN:-MAC_LEN])
        assert head == (msg.body.mtu, msg.body.keepalive_ms, msg.body.misses)
        assert nets == list(msg.body.networks)
        assert 1 <= runs <= len(nets)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mtus, regular_runs())
def test_property_regular_runs_are_one_run_each(mtu: int, runs: list[tuple[str, list[PodNetwork]]]) -> None:
    nets = tuple(n for _, group in runs for n in group)
    msg = message(Hello(mtu, nets))
    datagram = encode(msg, KEY)
    assert len(datagram) == HEADER_LEN + HELLO_HEAD + sum(run_len(prefix) for prefix, _ in runs) + MAC_LEN
    assert datagram[HEADER_LEN + 7] == len(runs)
    assert decode(datagram, KEY) == msg
    assert reference_hello(datagram[HEADER_LEN:-MAC_LEN])[1] == list(nets)


@given(st.data())
def test_property_any_single_byte_change_is_rejected(data: st.DataObject) -> None:
    datagram = encode(data.draw(messages), KEY)
    index = data.draw(st.integers(0, len(datagram) - 1), label="index")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != datagram[index]), label="new byte")
    with pytest.raises(ProtocolError):
        decode(patch(datagram, index, bytes([new])), KEY)


def _decode_only_protocol_errors(datagram: bytes, key: bytes) -> Message | None:
    try:
        return decode(datagram, key)
    except ProtocolError as exc:
        assert isinstance(exc.reason, Reject)
        return None


@given(st.binary(max_size=WIRE_MAX + 8))
def test_property_arbitrary_bytes_only_protocol_error(datagram: bytes) -> None:
    _decode_only_protocol_errors(datagram, KEY)


def mostly(good: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Draws from ``good`` about four times in five, so that valid and invalid inputs both occur."""
    return st.sampled_from([True, True, True, True, False]).flatmap(lambda ok: good if ok else bad)


def sometimes_bad(good: bool, ok: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``ok`` where the whole record is to be plausible; else mostly ``ok``, sometimes ``bad``."""
    return ok if good else mostly(ok, bad)


@st.composite
def run_record(draw: st.DrawFn, index: int) -> bytes:
    """One run's bytes: mostly of plausible values throughout (up to 4 networks, small steps, a name prefix of
    its own), else with any field out of range."""
    good = draw(mostly(st.just(True), st.just(False)))
    count = draw(sometimes_bad(good, st.integers(1, 4), st.sampled_from([0, MAX_NETWORKS + 1, 0xFFFF])))
    plen6 = draw(sometimes_bad(good, st.integers(0, 128) | st.just(ABSENT), st.integers(129, 254)))
    addr6 = draw(st.binary(min_size=16, max_size=16))
    plausible_prefix = st.text(alphabet=PREFIX_ALPHABET, max_size=9).map(lambda p: f"{p}{'abcd'[index]}-".encode())
    prefix = draw(sometimes_bad(good, plausible_prefix, st.binary(max_size=20)))
    head = struct.pack(
        RUN_FORMAT,
        count,
        draw(sometimes_bad(good, st.integers(1, 0xFFFFFF - 4000), st.sampled_from([0, 0x1000000, 2**32 - 1]))),
        draw(sometimes_bad(good, st.integers(1, 1000), st.sampled_from([0, 0xFFFFFF, 2**32 - 1]))),
        draw(sometimes_bad(good, st.integers(0, 32) | st.just(ABSENT), st.integers(33, 254))),
        draw(st.binary(min_size=4, max_size=4).map(lambda b: bytes([b[0] & 0x7F]) + b[1:])),  # no growing past the top
        draw(sometimes_bad(good, st.integers(0, 2**16), st.integers(0, 2**32 - 1))),
        plen6,
        addr6,
        draw(sometimes_bad(good, st.integers(0, 2**16), st.integers(0, 2**64 - 1))),
        draw(sometimes_bad(good, st.just(len(prefix)), st.integers(0, 255))),
    )
    widths = st.integers(1 if count > 1 else 0, 4)
    number = draw(sometimes_bad(good, st.integers(0, 9999), st.integers(0, 0xFFFF)))
    suffix = struct.pack("!HB", number, draw(sometimes_bad(good, widths, st.integers(5, 255))))
    return head + prefix + suffix


@st.composite
def plausible_datagrams(draw: st.DrawFn) -> bytes:
    """Magic, version 2, mostly a known type, a body of plausible length, mostly signed: every check is reached."""
    mtype = draw(mostly(st.integers(1, 5), st.integers(0, 255)))
    kind = draw(mostly(st.just("structured"), st.just("random")))
    if kind == "random":
        body = draw(st.binary(max_size=WIRE_MAX))
    elif mtype == MsgType.HELLO:
        nruns = draw(st.integers(0, 4))
        records = [draw(run_record(k)) for k in range(nruns)]
        good = draw(mostly(st.just(True), st.just(False)))
        head = struct.pack(
            "!HIBB",
            draw(sometimes_bad(good, mtus, st.integers(0, 67))),
            draw(sometimes_bad(good, st.integers(10, 3_600_000), st.integers(0, 2**32 - 1))),
            draw(sometimes_bad(good, st.integers(1, 100), st.integers(0, 255))),
            draw(sometimes_bad(good, st.just(nruns), st.integers(0, 255))),
        )
        body = head + b"".join(records) + draw(sometimes_bad(good, st.just(b""), st.binary(min_size=1, max_size=4)))
    elif mtype == MsgType.CONFIRM:
        body = draw(mostly(nonces, st.binary(max_size=40)))
    elif mtype == MsgType.GOODBYE:
        body = draw(mostly(st.just(b""), st.binary(max_size=4)))
    else:
        family = draw(mostly(st.sampled_from([4, 6]), st.integers(0, 255)))
        address = draw(st.binary(min_size=16, max_size=16))
        if family == 4 and draw(mostly(st.just(True), st.just(False))):
            address = address[:4] + bytes(12)
        endpoint = struct.pack("!B16sH", family, address, draw(st.integers(0, 65535)))
        built = draw(mostly(st.integers(0, MAX_NETWORKS), st.integers(MAX_NETWORKS + 1, 0xFFFF)))
        tail = struct.pack("!HH", draw(mostly(mtus, st.integers(0, 67))), built)
        body = draw(nonces) + endpoint if mtype == MsgType.CHALLENGE else endpoint + tail
    length = draw(mostly(st.just(len(body)), st.integers(0, 0xFFFF)))
    header = struct.pack(HEADER_FORMAT, MAGIC, VERSION, mtype, length, SESSION, 1, 2)
    tail = draw(mostly(st.just(mac(header + body)), st.binary(min_size=MAC_LEN, max_size=MAC_LEN)))
    return header + body + tail


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(plausible_datagrams())
def test_property_plausible_datagrams_only_protocol_error(datagram: bytes) -> None:
    decoded = _decode_only_protocol_errors(datagram, KEY)
    if decoded is not None:
        if isinstance(decoded.body, Hello):
            # what decode accepted is what the layout, read independently, says
            assert reference_hello(datagram[HEADER_LEN:-MAC_LEN])[1] == list(decoded.body.networks)
        # Whatever decode accepts, encode accepts too and reads back the same.
        assert decode(encode(decoded, KEY), KEY) == decoded


@given(st.binary(max_size=20).filter(lambda s: len(s) != 8), bodies)
def test_property_session_must_be_8_bytes(session: bytes, body: Body) -> None:
    msg = Message(session, 1, 1, body)
    with pytest.raises(ValueError, match="session"):
        validate(msg)
    with pytest.raises(ValueError, match="session"):
        encode(msg, KEY)


@given(st.integers().filter(lambda v: not 1 <= v <= 0xFFFFFF), any_hellos, st.data())
def test_property_vni_out_of_range(vni: int, hello: Hello, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(hello.networks) - 1), label="network")
    nets = list(hello.networks)
    nets[i] = PodNetwork(vni, nets[i].dev, nets[i].ipv4, nets[i].ipv6)
    msg = message(Hello(hello.mtu, tuple(nets)))
    with pytest.raises(ValueError, match="VNI"):
        validate(msg)
    with pytest.raises(ValueError, match="VNI"):
        encode(msg, KEY)


bad_dev_names = st.one_of(
    st.text(min_size=16, max_size=30),
    st.just(""),
    st.sampled_from([".", ".."]),
    st.tuples(dev_names, st.sampled_from("/: \t\n\0\x7fé"), dev_names).map(lambda t: (t[0] + t[1] + t[2])[:15]),
).filter(lambda s: ifname_problem(s) is not None)


@given(bad_dev_names, any_hellos, st.data())
def test_property_bad_dev_name(dev: str, hello: Hello, data: st.DataObject) -> None:
    i = data.draw(st.integers(0, len(hello.networks) - 1), label="network")
    nets = list(hello.networks)
    nets[i] = PodNetwork(nets[i].vni, dev, nets[i].ipv4, nets[i].ipv6)
    msg = message(Hello(hello.mtu, tuple(nets)))
    with pytest.raises(ValueError, match="device name"):
        validate(msg)
    with pytest.raises(ValueError, match="device name"):
        encode(msg, KEY)


@given(st.binary(max_size=40).filter(lambda b: len(b) != 16), endpoints, st.booleans())
def test_property_nonce_must_be_16_bytes(nonce: bytes, endpoint: Endpoint, confirm: bool) -> None:
    msg = message(Confirm(nonce) if confirm else Challenge(nonce, endpoint))
    with pytest.raises(ValueError, match="nonce"):
        encode(msg, KEY)


@given(
    st.integers(max_value=67) | st.integers(min_value=65536),
    st.one_of(any_hellos, st.builds(Ack, endpoints, mtus, st.integers(0, MAX_NETWORKS))),
)
def test_property_mtu_out_of_range(mtu: int, body: Hello | Ack) -> None:
    bad: Body = Hello(mtu, body.networks) if isinstance(body, Hello) else Ack(body.observed, mtu, body.built)
    with pytest.raises(ValueError, match="mtu"):
        encode(message(bad), KEY)


@given(st.integers(max_value=-1) | st.integers(min_value=MAX_NETWORKS + 1), endpoints, mtus)
def test_property_ack_built_out_of_range(built: int, endpoint: Endpoint, mtu: int) -> None:
    with pytest.raises(ValueError, match="built"):
        encode(message(Ack(endpoint, mtu, built)), KEY)


def test_hellos_are_retransmitted_soon_then_every_second() -> None:
    """The first hello often meets a Service whose endpoint kube-proxy has not programmed yet: for a second
    the next ones follow every 0.1 s, then the wait doubles up to a second."""
    from itertools import islice

    from pytest_svctunnel.connector import retransmit_intervals

    assert list(islice(retransmit_intervals(), 15)) == [0.1] * 10 + [0.2, 0.4, 0.8, 1.0, 1.0]
