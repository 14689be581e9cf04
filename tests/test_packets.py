"""Pure packet helpers: parsing received IP/UDP, building UDP with checksums, and the hello tap's cBPF program.

The filter is checked by running it: a small classic-BPF interpreter below executes exactly the
instructions the program uses, with the two ancillary loads (packet type, protocol) as inputs.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_svctunnel.packets import UdpDatagram, assemble, build_udp, hello_filter, parse_udp
from pytest_svctunnel.protocol import MAGIC, Endpoint

V4_SRC = ipaddress.IPv4Address("198.51.100.7")
V4_DST = ipaddress.IPv4Address("10.0.0.2")
V6_SRC = ipaddress.IPv6Address("2001:db8::7")
V6_DST = ipaddress.IPv6Address("fd00::2")
PORT = 5533
UDP, TCP = 17, 6
ETH_IP, ETH_IPV6, ETH_ARP, ETH_VLAN = 0x0800, 0x86DD, 0x0806, 0x8100
HOST, BROADCAST, MULTICAST, OTHERHOST, OUTGOING = 0, 1, 2, 3, 4

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address

T = TypeVar("T")


def ep(address: IPAddr, port: int) -> Endpoint:
    return Endpoint(address, port)


def ipv4_packet(
    l4: bytes,
    *,
    src: ipaddress.IPv4Address = V4_SRC,
    dst: ipaddress.IPv4Address = V4_DST,
    proto: int = UDP,
    frag: int = 0,
    options: bytes = b"",
    total: int | None = None,
    ihl: int | None = None,
) -> bytes:
    assert len(options) % 4 == 0
    words = 5 + len(options) // 4 if ihl is None else ihl
    length = 20 + len(options) + len(l4) if total is None else total
    header = struct.pack("!BBHHHBBH4s4s", 0x40 | words, 0, length, 0x1234, frag, 64, proto, 0, src.packed, dst.packed)
    return header + options + l4


def ipv6_packet(
    l4: bytes,
    *,
    src: ipaddress.IPv6Address = V6_SRC,
    dst: ipaddress.IPv6Address = V6_DST,
    next_header: int = UDP,
    payload_len: int | None = None,
) -> bytes:
    length = len(l4) if payload_len is None else payload_len
    return struct.pack("!IHBB16s16s", 0x60000000, length, next_header, 64, src.packed, dst.packed) + l4


def udp4(payload: bytes, sport: int = 40000, dport: int = PORT) -> bytes:
    return ipv4_packet(build_udp(ep(V4_SRC, sport), ep(V4_DST, dport), payload))


def udp6(payload: bytes, sport: int = 40000, dport: int = PORT) -> bytes:
    return ipv6_packet(build_udp(ep(V6_SRC, sport), ep(V6_DST, dport), payload))


def raw_udp(sport: int, dport: int, length: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, length, 0) + payload


# -- parse_udp ---------------------------------------------------------------------------------------------------

HELLO_BYTES = MAGIC + b"\x01\x01rest of a hello"
UDP4 = build_udp(ep(V4_SRC, 40000), ep(V4_DST, PORT), HELLO_BYTES)
UDP6 = build_udp(ep(V6_SRC, 40000), ep(V6_DST, PORT), HELLO_BYTES)
EXPECT4 = UdpDatagram(ep(V4_SRC, 40000), ep(V4_DST, PORT), HELLO_BYTES)
EXPECT6 = UdpDatagram(ep(V6_SRC, 40000), ep(V6_DST, PORT), HELLO_BYTES)

PARSE_OK: dict[str, tuple[bytes, UdpDatagram]] = {
    "ipv4": (ipv4_packet(UDP4), EXPECT4),
    "ipv4-options-ihl-6": (ipv4_packet(UDP4, options=b"\x01\x01\x01\x00"), EXPECT4),
    "ipv4-options-ihl-15": (ipv4_packet(UDP4, options=bytes(40)), EXPECT4),
    "ipv4-dont-fragment-set": (ipv4_packet(UDP4, frag=0x4000), EXPECT4),
    "ipv4-trailing-padding": (ipv4_packet(UDP4) + bytes(6), EXPECT4),
    "ipv4-empty-payload": (
        ipv4_packet(build_udp(ep(V4_SRC, 1), ep(V4_DST, 2), b"")),
        UdpDatagram(ep(V4_SRC, 1), ep(V4_DST, 2), b""),
    ),
    "ipv4-udp-shorter-than-ip": (
        ipv4_packet(raw_udp(40000, PORT, 8 + len(HELLO_BYTES), HELLO_BYTES + b"junk")),
        EXPECT4,
    ),
    "ipv6": (ipv6_packet(UDP6), EXPECT6),
    "ipv6-trailing-bytes": (ipv6_packet(UDP6) + b"\xff" * 9, EXPECT6),
    "ipv6-ports-extreme": (
        ipv6_packet(build_udp(ep(V6_SRC, 0), ep(V6_DST, 65535), b"x")),
        UdpDatagram(ep(V6_SRC, 0), ep(V6_DST, 65535), b"x"),
    ),
}


@pytest.mark.parametrize(("packet", "expected"), PARSE_OK.values(), ids=PARSE_OK.keys())
def test_parse_udp(packet: bytes, expected: UdpDatagram) -> None:
    assert parse_udp(packet) == expected


PARSE_NONE: dict[str, bytes] = {
    "empty": b"",
    "version-5": b"\x50" + ipv4_packet(UDP4)[1:],
    "version-0": bytes(60),
    "ipv4-tcp": ipv4_packet(UDP4, proto=TCP),
    "ipv4-icmp": ipv4_packet(UDP4, proto=1),
    "ipv6-tcp": ipv6_packet(UDP6, next_header=TCP),
    "ipv6-hop-by-hop-header": ipv6_packet(UDP6, next_header=0),
    "ipv4-more-fragments": ipv4_packet(UDP4, frag=0x2000),
    "ipv4-offset-1": ipv4_packet(UDP4, frag=0x0001),
    "ipv4-offset-max": ipv4_packet(UDP4, frag=0x1FFF),
    "ipv4-df-and-offset": ipv4_packet(UDP4, frag=0x4000 | 0x0100),
    "ipv4-19-bytes": ipv4_packet(UDP4)[:19],
    "ipv4-ihl-4": ipv4_packet(UDP4, ihl=4),
    "ipv4-ihl-0": ipv4_packet(UDP4, ihl=0),
    "ipv4-ihl-past-the-end": ipv4_packet(b"", ihl=15) + bytes(10),
    "ipv4-total-beyond-packet": ipv4_packet(UDP4, total=20 + len(UDP4) + 1),
    "ipv4-total-cuts-udp-header": ipv4_packet(UDP4, total=24),
    "ipv4-udp-header-truncated": ipv4_packet(UDP4[:7]),
    "ipv4-udp-length-beyond-packet": ipv4_packet(raw_udp(1, 2, 100, b"short")),
    "ipv4-udp-length-beyond-total": ipv4_packet(UDP4, total=20 + len(UDP4) - 1) + b"\0",
    "ipv4-udp-length-below-8": ipv4_packet(raw_udp(1, 2, 7, b"abc")),
    "ipv6-39-bytes": ipv6_packet(UDP6)[:39],
    "ipv6-payload-length-beyond-packet": ipv6_packet(UDP6, payload_len=len(UDP6) + 1),
    "ipv6-payload-length-cuts-udp-header": ipv6_packet(UDP6, payload_len=6),
    "ipv6-udp-length-beyond-payload": ipv6_packet(raw_udp(1, 2, 9, b"")),
    "ipv6-udp-length-0": ipv6_packet(raw_udp(1, 2, 0, b"abc")),
}


@pytest.mark.parametrize("packet", PARSE_NONE.values(), ids=PARSE_NONE.keys())
def test_parse_udp_refuses(packet: bytes) -> None:
    assert parse_udp(packet) is None


# -- build_udp ---------------------------------------------------------------------------------------------------


def ones_complement_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


def pseudo_header(src: IPAddr, dst: IPAddr, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + bytes([0, UDP]) + length.to_bytes(2, "big")
    return src.packed + dst.packed + length.to_bytes(4, "big") + bytes([0, 0, 0, UDP])


def assert_checksum_verifies(src: IPAddr, dst: IPAddr, segment: bytes) -> None:
    checksum = int.from_bytes(segment[6:8], "big")
    assert checksum != 0, "0 means 'no checksum' (and is illegal over IPv6)"
    assert ones_complement_sum(pseudo_header(src, dst, len(segment)) + segment) == 0xFFFF


BUILD: dict[str, tuple[IPAddr, IPAddr, bytes]] = {
    "ipv4-hello": (V4_SRC, V4_DST, HELLO_BYTES),
    "ipv4-empty": (V4_SRC, V4_DST, b""),
    "ipv4-odd-length": (V4_SRC, V4_DST, b"abc"),
    "ipv4-ones": (ipaddress.IPv4Address("255.255.255.255"), ipaddress.IPv4Address("255.255.255.255"), b"\xff" * 101),
    "ipv4-zeros": (ipaddress.IPv4Address("0.0.0.0"), ipaddress.IPv4Address("0.0.0.0"), bytes(64)),
    "ipv6-hello": (V6_SRC, V6_DST, HELLO_BYTES),
    "ipv6-empty": (V6_SRC, V6_DST, b""),
    "ipv6-odd-length": (V6_SRC, V6_DST, b"x" * 1001),
    "ipv6-ones": (ipaddress.IPv6Address(2**128 - 1), ipaddress.IPv6Address(2**128 - 1), b"\xff" * 7),
}


@pytest.mark.parametrize(("src", "dst", "payload"), BUILD.values(), ids=BUILD.keys())
def test_build_udp(src: IPAddr, dst: IPAddr, payload: bytes) -> None:
    segment = build_udp(ep(src, 1234), ep(dst, 5678), payload)
    assert struct.unpack("!HHH", segment[:6]) == (1234, 5678, 8 + len(payload))
    assert segment[8:] == payload
    assert_checksum_verifies(src, dst, segment)
    # Any change of the addresses breaks it: the pseudo-header really is covered.
    other = ipaddress.ip_address(int(dst) ^ 1)
    assert ones_complement_sum(pseudo_header(src, other, len(segment)) + segment) != 0xFFFF


def _payload_with_zero_checksum(src: IPAddr, dst: IPAddr) -> bytes:
    """A payload whose computed checksum is 0 (two trailing bytes balance the rest)."""
    prefix = b"zero-sum"
    length = 8 + len(prefix) + 2
    partial = ones_complement_sum(pseudo_header(src, dst, length) + struct.pack("!HHHH", 1, 2, length, 0) + prefix)
    return prefix + (0xFFFF - partial).to_bytes(2, "big")


@pytest.mark.parametrize(("src", "dst"), [(V4_SRC, V4_DST), (V6_SRC, V6_DST)], ids=["ipv4", "ipv6"])
def test_build_udp_sends_all_ones_for_a_zero_checksum(src: IPAddr, dst: IPAddr) -> None:
    payload = _payload_with_zero_checksum(src, dst)
    segment = build_udp(ep(src, 1), ep(dst, 2), payload)
    assert segment[6:8] == b"\xff\xff"
    assert_checksum_verifies(src, dst, segment)


@pytest.mark.parametrize(
    ("src", "dst"),
    [(ep(V4_SRC, 1), ep(V6_DST, 2)), (ep(V6_SRC, 1), ep(V4_DST, 2))],
    ids=["v4-to-v6", "v6-to-v4"],
)
def test_build_udp_refuses_mixed_families(src: Endpoint, dst: Endpoint) -> None:
    with pytest.raises(ValueError, match="one address family"):
        build_udp(src, dst, b"x")


ipv4_addresses = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ipv6_addresses = st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)


@given(
    st.one_of(st.tuples(ipv4_addresses, ipv4_addresses), st.tuples(ipv6_addresses, ipv6_addresses)),
    ports,
    ports,
    st.binary(max_size=1500),
)
def test_property_build_then_parse(addresses: tuple[IPAddr, IPAddr], sport: int, dport: int, payload: bytes) -> None:
    src, dst = addresses
    segment = build_udp(ep(src, sport), ep(dst, dport), payload)
    assert_checksum_verifies(src, dst, segment)
    if isinstance(src, ipaddress.IPv4Address) and isinstance(dst, ipaddress.IPv4Address):
        packet = ipv4_packet(segment, src=src, dst=dst)
    else:
        assert isinstance(src, ipaddress.IPv6Address) and isinstance(dst, ipaddress.IPv6Address)
        packet = ipv6_packet(segment, src=src, dst=dst)
    assert parse_udp(packet) == UdpDatagram(ep(src, sport), ep(dst, dport), payload)


# -- assemble ----------------------------------------------------------------------------------------------------


def test_assemble_resolves_forward_labels() -> None:
    program = assemble(
        [
            ("", 0x15, "yes", "no", 7),
            ("", 0x15, "", "no", 8),
            ("yes", 0x06, "", "", 1),
            ("no", 0x06, "", "", 0),
        ]
    )
    assert program == [(0x15, 1, 2, 7), (0x15, 0, 1, 8), (0x06, 0, 0, 1), (0x06, 0, 0, 0)]


def test_assemble_allows_the_longest_short_jump() -> None:
    source = [("", 0x15, "end", "", 0)] + [("", 0x06, "", "", 0)] * 255 + [("end", 0x06, "", "", 1)]
    assert assemble(source)[0] == (0x15, 255, 0, 0)


@pytest.mark.parametrize(
    "source",
    [
        [("top", 0x06, "", "", 0), ("", 0x15, "top", "", 0)],
        [("self", 0x15, "self", "", 0)],
        [("", 0x15, "", "back", 0), ("back", 0x15, "", "back", 0)],
        [("", 0x15, "far", "", 0)] + [("", 0x06, "", "", 0)] * 256 + [("far", 0x06, "", "", 1)],
    ],
    ids=["backward", "to-itself", "false-branch-to-itself", "256-ahead"],
)
def test_assemble_refuses_jumps_that_are_not_short_and_forward(source: list[tuple[str, int, str, str, int]]) -> None:
    with pytest.raises(ValueError, match="not a short forward jump"):
        assemble(source)


# -- the hello filter ----------------------------------------------------------------------------------------------

# linux/filter.h, written out here so that the program's opcodes are checked, not copied.
BPF_LD, BPF_LDX, BPF_JMP, BPF_RET = 0x00, 0x01, 0x05, 0x06
BPF_W, BPF_H, BPF_B = 0x00, 0x08, 0x10
BPF_IMM, BPF_ABS, BPF_IND, BPF_MSH = 0x00, 0x20, 0x40, 0xA0
BPF_JEQ, BPF_JSET = 0x10, 0x40
BPF_K = 0x00
SKF_AD_OFF = 2**32 - 0x1000
SKF_AD_PROTOCOL, SKF_AD_PKTTYPE = 0, 4

SIZES = {BPF_W: 4, BPF_H: 2, BPF_B: 1}
USED_OPCODES = {
    BPF_LD | BPF_W | BPF_ABS,
    BPF_LD | BPF_H | BPF_ABS,
    BPF_LD | BPF_B | BPF_ABS,
    BPF_LD | BPF_H | BPF_IND,
    BPF_LD | BPF_W | BPF_IND,
    BPF_LDX | BPF_B | BPF_MSH,
    BPF_LDX | BPF_W | BPF_IMM,
    BPF_JMP | BPF_JEQ | BPF_K,
    BPF_JMP | BPF_JSET | BPF_K,
    BPF_RET | BPF_K,
}


class OutOfBounds(Exception):
    """A load past the end of the packet: the kernel then ends the program, returning 0."""


def run_bpf(program: list[tuple[int, int, int, int]], packet: bytes, *, pkttype: int, protocol: int) -> int:
    """Classic BPF, as far as the hello filter needs it. Returns the RET value (0 = drop)."""

    def load(offset: int, size: int) -> int:
        if offset >= SKF_AD_OFF:
            ancillary = {SKF_AD_PROTOCOL: protocol, SKF_AD_PKTTYPE: pkttype}
            return ancillary[offset - SKF_AD_OFF]
        if offset + size > len(packet):
            raise OutOfBounds
        return int.from_bytes(packet[offset : offset + size], "big")

    a = x = 0
    pc = 0
    steps = 0
    try:
        while True:
            op, jt, jf, k = program[pc]
            assert op in USED_OPCODES, f"opcode {op:#x} at {pc}"
            pc += 1
            steps += 1
            assert steps <= len(program), "cBPF has no loops"
            cls, size, mode = op & 0x07, op & 0x18, op & 0xE0
            if cls == BPF_LD and mode == BPF_ABS:
                a = load(k, SIZES[size])
            elif cls == BPF_LD and mode == BPF_IND:
                a = load(x + k, SIZES[size])
            elif cls == BPF_LDX and mode == BPF_MSH:
                x = 4 * (load(k, 1) & 0x0F)
            elif cls == BPF_LDX and mode == BPF_IMM:
                x = k
            elif cls == BPF_JMP:
                taken = a == k if op & 0xF0 == BPF_JEQ else bool(a & k)
                pc += jt if taken else jf
            else:
                assert cls == BPF_RET
                return k
    except OutOfBounds:
        return 0


FILTER = hello_filter(PORT)


def test_filter_shape() -> None:
    """A program the kernel takes: known opcodes, jumps inside the program, accept or drop at the end."""
    assert FILTER[-2] == (BPF_RET | BPF_K, 0, 0, 0x40000)
    assert FILTER[-1] == (BPF_RET | BPF_K, 0, 0, 0)
    for pc, (op, jt, jf, _) in enumerate(FILTER):
        assert op in USED_OPCODES
        if op & 0x07 == BPF_JMP:
            assert pc + 1 + max(jt, jf) < len(FILTER)
        else:
            assert (jt, jf) == (0, 0)
    assert hello_filter(PORT) == FILTER
    assert hello_filter(PORT + 1) != FILTER


FILTER_CASES: dict[str, tuple[bytes, int, int, bool]] = {
    "ipv4-hello": (udp4(HELLO_BYTES), HOST, ETH_IP, True),
    "ipv6-hello": (udp6(HELLO_BYTES), HOST, ETH_IPV6, True),
    "ipv4-with-ip-options": (ipv4_packet(UDP4, options=bytes(12)), HOST, ETH_IP, True),
    "ipv4-max-options": (ipv4_packet(UDP4, options=bytes(40)), HOST, ETH_IP, True),
    "ipv4-dont-fragment": (ipv4_packet(UDP4, frag=0x4000), HOST, ETH_IP, True),
    "magic-only-payload": (udp4(MAGIC), HOST, ETH_IP, True),
    "ipv4-other-port": (udp4(HELLO_BYTES, dport=PORT + 1), HOST, ETH_IP, False),
    "ipv6-other-port": (udp6(HELLO_BYTES, dport=PORT - 1), HOST, ETH_IPV6, False),
    "ipv4-port-only-as-source": (udp4(HELLO_BYTES, sport=PORT, dport=53), HOST, ETH_IP, False),
    "ipv6-port-only-as-source": (udp6(HELLO_BYTES, sport=PORT, dport=53), HOST, ETH_IPV6, False),
    "ipv4-no-magic": (udp4(b"SVTX" + HELLO_BYTES[4:]), HOST, ETH_IP, False),
    "ipv6-no-magic": (udp6(b"VXLAN data" * 3), HOST, ETH_IPV6, False),
    "ipv4-magic-later": (udp4(b"\0" + HELLO_BYTES), HOST, ETH_IP, False),
    "ipv4-payload-3-bytes": (udp4(MAGIC[:3]), HOST, ETH_IP, False),
    "ipv6-empty-payload": (udp6(b""), HOST, ETH_IPV6, False),
    "ipv4-tcp": (ipv4_packet(UDP4, proto=TCP), HOST, ETH_IP, False),
    "ipv6-tcp": (ipv6_packet(UDP6, next_header=TCP), HOST, ETH_IPV6, False),
    "ipv4-more-fragments": (ipv4_packet(UDP4, frag=0x2000), HOST, ETH_IP, False),
    "ipv4-offset-nonzero": (ipv4_packet(UDP4, frag=0x0001), HOST, ETH_IP, False),
    "ipv4-offset-max": (ipv4_packet(UDP4, frag=0x1FFF), HOST, ETH_IP, False),
    "ipv4-df-and-offset": (ipv4_packet(UDP4, frag=0x4000 | 0x00B9), HOST, ETH_IP, False),
    "ipv4-outgoing": (udp4(HELLO_BYTES), OUTGOING, ETH_IP, False),
    "ipv6-outgoing": (udp6(HELLO_BYTES), OUTGOING, ETH_IPV6, False),
    "ipv4-other-host": (udp4(HELLO_BYTES), OTHERHOST, ETH_IP, False),
    "ipv4-broadcast": (udp4(HELLO_BYTES), BROADCAST, ETH_IP, False),
    "ipv6-multicast": (udp6(HELLO_BYTES), MULTICAST, ETH_IPV6, False),
    "arp-ethertype": (udp4(HELLO_BYTES), HOST, ETH_ARP, False),
    "vlan-ethertype": (udp4(HELLO_BYTES), HOST, ETH_VLAN, False),
    "ethertype-zero": (udp6(HELLO_BYTES), HOST, 0, False),
    "truncated-ipv4-header": (udp4(HELLO_BYTES)[:12], HOST, ETH_IP, False),
    "truncated-before-magic": (udp4(HELLO_BYTES)[:29], HOST, ETH_IP, False),
    "truncated-ipv6": (udp6(HELLO_BYTES)[:41], HOST, ETH_IPV6, False),
    "empty": (b"", HOST, ETH_IP, False),
}


@pytest.mark.parametrize(("packet", "pkttype", "protocol", "accept"), FILTER_CASES.values(), ids=FILTER_CASES.keys())
def test_filter_behaviour(packet: bytes, pkttype: int, protocol: int, accept: bool) -> None:
    assert run_bpf(FILTER, packet, pkttype=pkttype, protocol=protocol) == (0x40000 if accept else 0)


@pytest.mark.parametrize("port", [1, 53, 4789, 65535])
def test_filter_follows_its_port(port: int) -> None:
    program = hello_filter(port)
    assert run_bpf(program, udp4(HELLO_BYTES, dport=port), pkttype=HOST, protocol=ETH_IP) == 0x40000
    assert run_bpf(program, udp6(HELLO_BYTES, dport=port), pkttype=HOST, protocol=ETH_IPV6) == 0x40000
    assert run_bpf(program, udp4(HELLO_BYTES, dport=port ^ 1), pkttype=HOST, protocol=ETH_IP) == 0


def mostly(good: st.SearchStrategy[T], other: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """``good`` about four times in five, so that accepted and dropped packets both come up often."""
    return st.sampled_from([True, True, True, True, False]).flatmap(lambda ok: good if ok else other)


@st.composite
def tapped_packets(draw: st.DrawFn) -> tuple[bytes, int, int, dict[str, int | bool | bytes]]:
    """A random packet as the tap would see it, with the facts a plain predicate needs."""
    v6 = draw(st.booleans())
    sport = draw(mostly(ports, st.just(PORT)))
    dport = draw(mostly(st.just(PORT), ports))
    payload = draw(mostly(st.binary(max_size=40).map(lambda b: MAGIC + b), st.binary(max_size=40)))
    proto = draw(mostly(st.just(UDP), st.integers(0, 255)))
    frag = draw(mostly(st.sampled_from([0, 0x4000]), st.integers(0, 0xFFFF)))
    pkttype = draw(mostly(st.just(HOST), st.integers(0, 7)))
    ethertype = draw(mostly(st.just("match"), st.just("other")))
    options = draw(st.integers(0, 10)) * 4
    if v6:
        segment = build_udp(ep(V6_SRC, sport), ep(V6_DST, dport), payload)
        packet = ipv6_packet(segment, next_header=proto)
    else:
        segment = build_udp(ep(V4_SRC, sport), ep(V4_DST, dport), payload)
        packet = ipv4_packet(segment, proto=proto, frag=frag, options=bytes(options))
    if ethertype == "match":
        protocol = ETH_IPV6 if v6 else ETH_IP
    else:
        protocol = draw(st.integers(0, 0xFFFF).filter(lambda p: p not in (ETH_IP, ETH_IPV6)))
    facts: dict[str, int | bool | bytes] = {
        "v6": v6,
        "dport": dport,
        "payload": payload,
        "proto": proto,
        "frag": frag,
        "matching_ethertype": ethertype == "match",
    }
    return packet, pkttype, protocol, facts


def is_hello_for_us(pkttype: int, facts: dict[str, int | bool | bytes], port: int) -> bool:
    payload = facts["payload"]
    assert isinstance(payload, bytes)
    frag = facts["frag"]
    assert isinstance(frag, int)
    return (
        pkttype == HOST
        and bool(facts["matching_ethertype"])
        and facts["proto"] == UDP
        and (bool(facts["v6"]) or (frag & 0x2000 == 0 and frag & 0x1FFF == 0))
        and facts["dport"] == port
        and payload.startswith(MAGIC)
    )


@given(tapped_packets())
def test_property_filter_matches_the_plain_predicate(
    case: tuple[bytes, int, int, dict[str, int | bool | bytes]],
) -> None:
    packet, pkttype, protocol, facts = case
    accepted = run_bpf(FILTER, packet, pkttype=pkttype, protocol=protocol) != 0
    assert accepted == is_hello_for_us(pkttype, facts, PORT)
    if accepted:
        # Whatever passes the filter, the parser reads as UDP to the port with the magic.
        datagram = parse_udp(packet)
        assert datagram is not None
        assert datagram.destination.port == PORT and datagram.payload.startswith(MAGIC)


@given(ports.filter(lambda p: p != 0), st.binary(max_size=8).map(lambda b: MAGIC + b), st.booleans())
def test_property_filter_accepts_hellos_on_any_port(port: int, payload: bytes, v6: bool) -> None:
    packet = udp6(payload, dport=port) if v6 else udp4(payload, dport=port)
    assert run_bpf(hello_filter(port), packet, pkttype=HOST, protocol=ETH_IPV6 if v6 else ETH_IP) == 0x40000
