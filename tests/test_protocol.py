"""The handshake wire protocol: round trips, every rejection decode can give, and properties over bytes."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import struct
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
    PodNetwork,
    ProtocolError,
    Reject,
    decode,
    encode,
    peek_type,
    validate,
)
from pytest_svctunnel.values import ifname_problem

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SESSION = b"\x01\x02\x03\x04\x05\x06\x07\x08"
NONCE = bytes(range(100, 116))

# The wire layout, written out independently of the module's struct definitions.
NETWORK_LEN = 4 + 1 + 4 + 1 + 16 + 16  # vni, v4 plen, v4, v6 plen, v6, device name
ENDPOINT_LEN = 1 + 16 + 2  # family, padded address, port
HELLO_FIXED = 3 + 5  # mtu, network count; keepalive interval, misses
NET0 = HEADER_LEN + 3  # network records follow mtu and count
OFF_VNI, OFF_PLEN4, OFF_ADDR4, OFF_PLEN6, OFF_ADDR6, OFF_NAME = 0, 4, 5, 9, 10, 26
ABSENT = 0xFF

T = TypeVar("T")


def mac(data: bytes, key: bytes = KEY) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def resign(datagram: bytes, key: bytes = KEY) -> bytes:
    """Replace the MAC of ``datagram`` so that only later checks can reject it."""
    signed = datagram[:-MAC_LEN]
    return signed + mac(signed, key)


def raw_datagram(mtype: int, body: bytes, *, body_len: int | None = None, key: bytes = KEY) -> bytes:
    """A correctly signed datagram with any type and body bytes, built by hand."""
    length = len(body) if body_len is None else body_len
    header = struct.pack("!4sBBH8sQQ", MAGIC, VERSION, mtype, length, SESSION, 9, 1_700_000_000_000)
    return header + body + mac(header + body, key)


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new) :]


def net(i: int, *, v4: bool = True, v6: bool = True) -> PodNetwork:
    return PodNetwork(
        vni=100 + i,
        dev=f"svt-x{i}",
        ipv4=ipaddress.IPv4Interface(f"10.40.{i}.1/30") if v4 else None,
        ipv6=ipaddress.IPv6Interface(f"fd00:40:{i:x}::1/126") if v6 else None,
    )


def message(body: Body, *, session: bytes = SESSION, counter: int = 7, stamp: int = 1_700_000_000_123) -> Message:
    return Message(session, counter, stamp, body)


V4_END = Endpoint(ipaddress.IPv4Address("203.0.113.9"), 40123)
V6_END = Endpoint(ipaddress.IPv6Address("2001:db8::9"), 65535)

ROUND_TRIP = {
    "hello-1-network": message(Hello(1450, (net(0),))),
    "hello-16-networks": message(Hello(1500, tuple(net(i) for i in range(MAX_NETWORKS)))),
    "hello-fast-keepalive": message(Hello(1450, (net(0),), keepalive_ms=250, misses=2)),
    "hello-ipv4-only": message(Hello(68, (net(1, v6=False),))),
    "hello-ipv6-only": message(Hello(65535, (net(2, v4=False),))),
    "hello-mixed-families": message(Hello(9000, (net(1, v6=False), net(2, v4=False), net(3)))),
    "hello-no-addresses": message(Hello(1400, (net(4, v4=False, v6=False),))),
    "challenge-ipv4": message(Challenge(NONCE, V4_END)),
    "challenge-ipv6": message(Challenge(NONCE, V6_END)),
    "confirm": message(Confirm(NONCE)),
    "ack-ipv4": message(Ack(V4_END, 1450, 1)),
    "ack-ipv6": message(Ack(V6_END, 68, 16)),
    "goodbye": message(Goodbye()),
    "extreme-header-values": message(Confirm(bytes(16)), session=bytes(8), counter=2**64 - 1, stamp=0),
}

EXPECTED_TYPE = {
    Hello: MsgType.HELLO,
    Challenge: MsgType.CHALLENGE,
    Confirm: MsgType.CONFIRM,
    Ack: MsgType.ACK,
    Goodbye: MsgType.GOODBYE,
}


def body_len(body: Body) -> int:
    if isinstance(body, Hello):
        return HELLO_FIXED + NETWORK_LEN * len(body.networks)
    if isinstance(body, Challenge):
        return 16 + ENDPOINT_LEN
    if isinstance(body, Confirm):
        return 16
    if isinstance(body, Goodbye):
        return 0
    return ENDPOINT_LEN + 3


@pytest.mark.parametrize("msg", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_round_trip(msg: Message) -> None:
    datagram = encode(msg, KEY)
    assert len(datagram) == HEADER_LEN + body_len(msg.body) + MAC_LEN
    assert len(datagram) <= MAX_DATAGRAM
    assert datagram[:4] == MAGIC and datagram[4] == VERSION
    assert datagram[5] == EXPECTED_TYPE[type(msg.body)]
    assert datagram[-MAC_LEN:] == mac(datagram[:-MAC_LEN])
    decoded = decode(datagram, KEY)
    assert decoded == msg
    assert decoded.type is EXPECTED_TYPE[type(msg.body)]
    assert peek_type(datagram) is decoded.type


def test_hello_with_16_networks_is_the_largest_datagram() -> None:
    assert len(encode(ROUND_TRIP["hello-16-networks"], KEY)) == MAX_DATAGRAM


def test_endpoint_str() -> None:
    assert str(V4_END) == "203.0.113.9:40123"
    assert str(V6_END) == "[2001:db8::9]:65535"


# -- every rejection decode can give -------------------------------------------------------------------------------

HELLO = encode(ROUND_TRIP["hello-1-network"], KEY)
HELLO16 = encode(ROUND_TRIP["hello-16-networks"], KEY)
CHALLENGE = encode(ROUND_TRIP["challenge-ipv4"], KEY)
CONFIRM = encode(ROUND_TRIP["confirm"], KEY)
ACK = encode(ROUND_TRIP["ack-ipv4"], KEY)
ACK6 = encode(ROUND_TRIP["ack-ipv6"], KEY)


def hello_net_field(offset: int, new: bytes, *, index: int = 0, base: bytes = HELLO) -> bytes:
    """``base`` with one field of its index-th network record replaced, and signed again."""
    return resign(patch(base, NET0 + index * NETWORK_LEN + offset, new))


def dev_field(name: bytes) -> bytes:
    return name.ljust(16, b"\0")


def hello_with(
    *nets: PodNetwork, mtu: int = 1450, count: int | None = None, keepalive_ms: int = 5000, misses: int = 3
) -> bytes:
    """A signed hello built by hand, so that validate() cannot stop what the test wants on the wire."""
    records = b"".join(
        struct.pack(
            "!IB4sB16s16s",
            n.vni,
            n.ipv4.network.prefixlen if n.ipv4 else ABSENT,
            n.ipv4.ip.packed if n.ipv4 else bytes(4),
            n.ipv6.network.prefixlen if n.ipv6 else ABSENT,
            n.ipv6.ip.packed if n.ipv6 else bytes(16),
            dev_field(n.dev.encode()),
        )
        for n in nets
    )
    head = struct.pack("!HB", mtu, len(nets) if count is None else count)
    return raw_datagram(MsgType.HELLO, head + records + struct.pack("!IB", keepalive_ms, misses))


def endpoint_bytes(family: int, address: bytes, port: int = 4000) -> bytes:
    return struct.pack("!B16sH", family, address.ljust(16, b"\0"), port)


BAD_DATAGRAMS: dict[str, tuple[bytes, Reject]] = {
    # size
    "empty": (b"", Reject.TRUNCATED),
    "header-only": (HELLO[:HEADER_LEN], Reject.TRUNCATED),
    "one-byte-short-of-header-and-mac": (CONFIRM[: HEADER_LEN + MAC_LEN - 1], Reject.TRUNCATED),
    "one-byte-over-maximum": (HELLO16 + b"\0", Reject.OVERSIZED),
    "huge": (bytes(65507), Reject.OVERSIZED),
    # header fields, checked before the MAC
    "bad-magic": (patch(HELLO, 0, b"SVTX"), Reject.MAGIC),
    "magic-lowercase": (patch(HELLO, 0, b"svtn"), Reject.MAGIC),
    "version-0": (patch(HELLO, 4, b"\x00"), Reject.VERSION),
    "version-2": (patch(HELLO, 4, b"\x02"), Reject.VERSION),
    "version-2-resigned": (resign(patch(HELLO, 4, b"\x02")), Reject.VERSION),
    "type-0": (patch(HELLO, 5, b"\x00"), Reject.TYPE),
    "type-6": (patch(HELLO, 5, b"\x06"), Reject.TYPE),
    "type-255-resigned": (resign(patch(CONFIRM, 5, b"\xff")), Reject.TYPE),
    "body-length-plus-1": (patch(HELLO, 6, struct.pack("!H", len(HELLO) - HEADER_LEN - MAC_LEN + 1)), Reject.LENGTH),
    "body-length-minus-1": (patch(ACK, 6, struct.pack("!H", 21)), Reject.LENGTH),
    "trailing-byte": (CONFIRM + b"\0", Reject.LENGTH),
    "mac-cut-short": (CONFIRM[:-1], Reject.LENGTH),
    "body-length-0xffff": (patch(CONFIRM, 6, b"\xff\xff"), Reject.LENGTH),
    # authentication
    "last-mac-byte-flipped": (CONFIRM[:-1] + bytes([CONFIRM[-1] ^ 1]), Reject.MAC),
    "mac-zeroed": (CONFIRM[:-MAC_LEN] + bytes(MAC_LEN), Reject.MAC),
    "signed-with-other-key": (resign(HELLO, OTHER_KEY), Reject.MAC),
    "counter-changed": (patch(HELLO, 16, b"\x99"), Reject.MAC),
    "body-changed": (patch(CHALLENGE, HEADER_LEN, b"\x00"), Reject.MAC),
    "type-swapped-same-length": (patch(CONFIRM, 5, bytes([MsgType.HELLO])), Reject.MAC),
    # bodies that pass the MAC but do not parse
    "hello-zero-networks": (raw_datagram(MsgType.HELLO, struct.pack("!HB", 1450, 0)), Reject.BODY),
    "hello-17-networks": (resign(patch(HELLO16, HEADER_LEN + 2, bytes([17]))), Reject.BODY),
    "hello-count-2-with-1-record": (hello_with(net(0), count=2), Reject.BODY),
    "hello-count-1-with-2-records": (hello_with(net(0), net(1), count=1), Reject.BODY),
    "hello-body-2-bytes": (raw_datagram(MsgType.HELLO, b"\x05\xdc"), Reject.BODY),
    "hello-body-empty": (raw_datagram(MsgType.HELLO, b""), Reject.BODY),
    "hello-mtu-10": (hello_with(net(0), mtu=10), Reject.BODY),
    "hello-mtu-67": (hello_with(net(0), mtu=67), Reject.BODY),
    "hello-keepalive-9ms": (hello_with(net(0), keepalive_ms=9), Reject.BODY),
    "hello-misses-0": (hello_with(net(0), misses=0), Reject.BODY),
    "hello-misses-101": (hello_with(net(0), misses=101), Reject.BODY),
    "ipv4-prefix-33": (hello_net_field(OFF_PLEN4, bytes([33])), Reject.BODY),
    "ipv4-prefix-254": (hello_net_field(OFF_PLEN4, bytes([254])), Reject.BODY),
    "ipv6-prefix-129": (hello_net_field(OFF_PLEN6, bytes([129])), Reject.BODY),
    "dev-empty": (hello_net_field(OFF_NAME, bytes(16)), Reject.BODY),
    "dev-16-characters": (hello_net_field(OFF_NAME, b"abcdefghijklmnop"), Reject.BODY),
    "dev-slash": (hello_net_field(OFF_NAME, dev_field(b"eth/0")), Reject.BODY),
    "dev-colon": (hello_net_field(OFF_NAME, dev_field(b"eth0:1")), Reject.BODY),
    "dev-space": (hello_net_field(OFF_NAME, dev_field(b"eth 0")), Reject.BODY),
    "dev-dot": (hello_net_field(OFF_NAME, dev_field(b".")), Reject.BODY),
    "dev-dotdot": (hello_net_field(OFF_NAME, dev_field(b"..")), Reject.BODY),
    "dev-leading-nul": (hello_net_field(OFF_NAME, dev_field(b"\0eth0")), Reject.BODY),
    "dev-embedded-nul": (hello_net_field(OFF_NAME, dev_field(b"et\0h0")), Reject.BODY),
    "dev-control-char": (hello_net_field(OFF_NAME, dev_field(b"eth\x070")), Reject.BODY),
    "dev-not-ascii": (hello_net_field(OFF_NAME, dev_field(b"eth\xff")), Reject.BODY),
    "vni-0": (hello_net_field(OFF_VNI, struct.pack("!I", 0)), Reject.BODY),
    "vni-2**24": (hello_net_field(OFF_VNI, struct.pack("!I", 2**24)), Reject.BODY),
    "vni-2**32-1": (hello_net_field(OFF_VNI, struct.pack("!I", 2**32 - 1)), Reject.BODY),
    "duplicate-vni": (hello_with(net(0), PodNetwork(100, "other", None, None)), Reject.BODY),
    "duplicate-dev": (hello_with(net(0), PodNetwork(999, "svt-x0", None, None)), Reject.BODY),
    "duplicate-vni-in-16": (hello_net_field(OFF_VNI, struct.pack("!I", 100), index=15, base=HELLO16), Reject.BODY),
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
    "ack-mtu-67": (resign(patch(ACK, HEADER_LEN + ENDPOINT_LEN, struct.pack("!H", 67))), Reject.BODY),
    "ack-family-6-as-4": (resign(patch(ACK6, HEADER_LEN, b"\x04")), Reject.BODY),
    "ack-family-255": (resign(patch(ACK, HEADER_LEN, b"\xff")), Reject.BODY),
    "ack-built-17": (resign(patch(ACK, HEADER_LEN + ENDPOINT_LEN + 2, bytes([17]))), Reject.BODY),
}


@pytest.mark.parametrize(("datagram", "reason"), BAD_DATAGRAMS.values(), ids=BAD_DATAGRAMS.keys())
def test_decode_rejects(datagram: bytes, reason: Reject) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(datagram, KEY)
    assert info.value.reason is reason
    assert str(info.value).startswith(reason.value)


def test_body_rejections_are_past_the_mac_check() -> None:
    """The BODY cases above are signed: the same bytes with their MAC broken are refused as MAC."""
    for name, (datagram, reason) in BAD_DATAGRAMS.items():
        if reason is not Reject.BODY:
            continue
        with pytest.raises(ProtocolError) as info:
            decode(datagram, OTHER_KEY)
        assert info.value.reason is Reject.MAC, name


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
    "hello-17-networks": message(Hello(1450, tuple(net(i) for i in range(17)))),
    "vni-0": message(Hello(1450, (PodNetwork(0, "eth0", None, None),))),
    "vni-2**24": message(Hello(1450, (PodNetwork(2**24, "eth0", None, None),))),
    "vni-negative": message(Hello(1450, (PodNetwork(-1, "eth0", None, None),))),
    "dev-empty": message(Hello(1450, (PodNetwork(5, "", None, None),))),
    "dev-16-chars": message(Hello(1450, (PodNetwork(5, "a" * 16, None, None),))),
    "dev-slash": message(Hello(1450, (PodNetwork(5, "a/b", None, None),))),
    "dev-non-ascii": message(Hello(1450, (PodNetwork(5, "ethé", None, None),))),
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
    "ack-built-256": message(Ack(V4_END, 1450, 256)),
    "ack-built-17": message(Ack(V4_END, 1450, MAX_NETWORKS + 1)),
    "ack-built-negative": message(Ack(V4_END, 1450, -1)),
}


@pytest.mark.parametrize("msg", UNREPRESENTABLE.values(), ids=UNREPRESENTABLE.keys())
def test_encode_refuses_unrepresentable_fields_with_value_error(msg: Message) -> None:
    """encode() promises ValueError on out-of-range fields, not struct.error."""
    with pytest.raises(ValueError):
        encode(msg, KEY)


@pytest.mark.parametrize("msg", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_validate_accepts_valid_messages(msg: Message) -> None:
    validate(msg)


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
ipv6_ifaces = st.builds(ipaddress.IPv6Interface, st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 128)))
pod_networks = st.builds(
    PodNetwork, vni=vnis, dev=dev_names, ipv4=st.none() | ipv4_ifaces, ipv6=st.none() | ipv6_ifaces
)
addresses = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)) | st.builds(
    ipaddress.IPv6Address, st.integers(0, 2**128 - 1)
)
endpoints = st.builds(Endpoint, addresses, st.integers(0, 65535))
mtus = st.integers(68, 65535)
nonces = st.binary(min_size=16, max_size=16)
hellos = st.builds(
    Hello,
    mtus,
    st.lists(pod_networks, min_size=1, max_size=MAX_NETWORKS, unique_by=(lambda n: n.vni, lambda n: n.dev)).map(tuple),
)
bodies: st.SearchStrategy[Body] = st.one_of(
    hellos,
    st.builds(Challenge, nonces, endpoints),
    st.builds(Confirm, nonces),
    st.builds(Ack, endpoints, mtus, st.integers(0, MAX_NETWORKS)),
)
messages = st.builds(
    Message,
    session=st.binary(min_size=8, max_size=8),
    counter=st.integers(0, 2**64 - 1),
    timestamp_ms=st.integers(0, 2**64 - 1),
    body=bodies,
)
keys = st.binary(min_size=0, max_size=64)


@given(messages, keys)
def test_property_round_trip(msg: Message, key: bytes) -> None:
    datagram = encode(msg, key)
    assert len(datagram) <= MAX_DATAGRAM
    assert decode(datagram, key) == msg
    assert peek_type(datagram) is msg.type


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


@given(st.binary(max_size=MAX_DATAGRAM + 8))
def test_property_arbitrary_bytes_only_protocol_error(datagram: bytes) -> None:
    _decode_only_protocol_errors(datagram, KEY)


def mostly(good: st.SearchStrategy[T], bad: st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    """Draws from ``good`` about four times in five, so that valid and invalid inputs both occur."""
    return st.sampled_from([True, True, True, True, False]).flatmap(lambda ok: good if ok else bad)


@st.composite
def network_record(draw: st.DrawFn) -> bytes:
    return struct.pack(
        "!IB4sB16s16s",
        draw(mostly(vnis, st.sampled_from([0, 0x1000000, 2**32 - 1]))),
        draw(mostly(st.integers(0, 32) | st.just(ABSENT), st.integers(33, 254))),
        draw(st.binary(min_size=4, max_size=4)),
        draw(mostly(st.integers(0, 128) | st.just(ABSENT), st.integers(129, 254))),
        draw(st.binary(min_size=16, max_size=16)),
        draw(mostly(dev_names.map(str.encode), st.binary(max_size=16))).ljust(16, b"\0"),
    )


@st.composite
def plausible_datagrams(draw: st.DrawFn) -> bytes:
    """Magic, version 1, mostly a known type, a body of plausible length, mostly signed: every check is reached."""
    mtype = draw(mostly(st.integers(1, 5), st.integers(0, 255)))
    kind = draw(mostly(st.just("structured"), st.just("random")))
    if kind == "random":
        body = draw(st.binary(max_size=MAX_DATAGRAM))
    elif mtype == MsgType.HELLO:
        records = draw(st.lists(network_record(), min_size=0, max_size=MAX_NETWORKS))
        count = draw(mostly(st.just(len(records)), st.integers(0, 255)))
        body = struct.pack("!HB", draw(mostly(mtus, st.integers(0, 67))), count) + b"".join(records)
    elif mtype == MsgType.CONFIRM:
        body = draw(mostly(nonces, st.binary(max_size=40)))
    else:
        family = draw(mostly(st.sampled_from([4, 6]), st.integers(0, 255)))
        address = draw(st.binary(min_size=16, max_size=16))
        if family == 4 and draw(mostly(st.just(True), st.just(False))):
            address = address[:4] + bytes(12)
        endpoint = struct.pack("!B16sH", family, address, draw(st.integers(0, 65535)))
        tail = struct.pack("!HB", draw(mostly(mtus, st.integers(0, 67))), draw(st.integers(0, 255)))
        body = draw(nonces) + endpoint if mtype == MsgType.CHALLENGE else endpoint + tail
    length = draw(mostly(st.just(len(body)), st.integers(0, 0xFFFF)))
    header = struct.pack("!4sBBH8sQQ", MAGIC, VERSION, mtype, length, SESSION, 1, 2)
    tail = draw(mostly(st.just(mac(header + body)), st.binary(min_size=MAC_LEN, max_size=MAC_LEN)))
    return header + body + tail


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(plausible_datagrams())
def test_property_plausible_datagrams_only_protocol_error(datagram: bytes) -> None:
    decoded = _decode_only_protocol_errors(datagram, KEY)
    if decoded is not None:
        # Whatever decode accepts, encode accepts too and reads back the same.
        assert decode(encode(decoded, KEY), KEY) == decoded


@given(st.binary(max_size=20).filter(lambda s: len(s) != 8), bodies)
def test_property_session_must_be_8_bytes(session: bytes, body: Body) -> None:
    msg = Message(session, 1, 1, body)
    with pytest.raises(ValueError, match="session"):
        validate(msg)
    with pytest.raises(ValueError, match="session"):
        encode(msg, KEY)


@given(st.integers().filter(lambda v: not 1 <= v <= 0xFFFFFF), hellos, st.data())
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


@given(bad_dev_names, hellos)
def test_property_bad_dev_name(dev: str, hello: Hello) -> None:
    first = hello.networks[0]
    msg = message(Hello(hello.mtu, (PodNetwork(first.vni, dev, first.ipv4, first.ipv6), *hello.networks[1:])))
    with pytest.raises(ValueError, match="device name"):
        encode(msg, KEY)


@given(st.binary(max_size=40).filter(lambda b: len(b) != 16), endpoints, st.booleans())
def test_property_nonce_must_be_16_bytes(nonce: bytes, endpoint: Endpoint, confirm: bool) -> None:
    msg = message(Confirm(nonce) if confirm else Challenge(nonce, endpoint))
    with pytest.raises(ValueError, match="nonce"):
        encode(msg, KEY)


@given(
    st.integers(max_value=67) | st.integers(min_value=65536),
    st.one_of(hellos, st.builds(Ack, endpoints, mtus, st.integers(0, MAX_NETWORKS))),
)
def test_property_mtu_out_of_range(mtu: int, body: Hello | Ack) -> None:
    bad: Body = Hello(mtu, body.networks) if isinstance(body, Hello) else Ack(body.observed, mtu, body.built)
    with pytest.raises(ValueError, match="mtu"):
        encode(message(bad), KEY)


def test_hellos_are_retransmitted_soon_then_every_second() -> None:
    """The first hello often meets a Service whose endpoint kube-proxy has not programmed yet: for a second
    the next ones follow every 0.1 s, then the wait doubles up to a second."""
    from itertools import islice

    from pytest_svctunnel.connector import retransmit_intervals

    assert list(islice(retransmit_intervals(), 15)) == [0.1] * 10 + [0.2, 0.4, 0.8, 1.0, 1.0]
