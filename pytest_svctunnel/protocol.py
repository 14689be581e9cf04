"""The handshake wire protocol: pure functions over bytes.

Four messages open a tunnel, all HMAC-SHA256 authenticated with the session key:

1. HELLO (external -> pod): which networks to build, sent from the external end's
   tunnel source port to the Service address. It opens the flow through every NAT
   and load balancer on the way.
2. CHALLENGE (pod -> external): a fresh nonce, plus the address and port the pod
   saw the hello come from (after all NAT).
3. CONFIRM (external -> pod): the nonce back. Only now does the pod commit to the
   sender as its peer, so a replayed or raced hello can never move the tunnel.
4. ACK (pod -> external): the networks are built; the pod's view of the peer.

One message ends it: GOODBYE (external -> pod) asks the pod end to remove everything it
built and exit; the pod end answers with a GOODBYE of its own once that is done.

Layout: a fixed 32-byte header, a type-specific body, and a 32-byte MAC over both. The MAC is
checked in constant time before the body is parsed. A hello packs its networks as runs
(``netcodec``); no datagram is larger than MAX_DATAGRAM, 1200 bytes, so none is ever fragmented
on a path whose MTU is IPv6's minimum of 1280 (encode refuses a hello that would be larger).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from .netcodec import (
    MAX_NETWORKS,
    MAX_RUNS,
    PodNetwork,
    decode_runs,
    encode_runs,
    encoded_size,
    pack_runs,
    validate_network,
)
from .values import IPAddress

MAGIC = b"SVTN"
DEFAULT_PORT = 5533  # the Service port and the pod end's listening port, as in the original
VERSION = 2  # 2: a hello's networks as runs
MAC_LEN = 32
NONCE_LEN = 16
SESSION_LEN = 8

_HEADER = struct.Struct("!4sBBH8sQQ")  # magic, version, type, body length, session, counter, ms
_HELLO = struct.Struct("!HIBB")  # mtu, keepalive interval in ms, misses before dead, runs of networks
_ENDPOINT = struct.Struct("!B16sH")  # family (4/6), address (padded), port
_BUILT = struct.Struct("!HH")  # mtu, networks built

HEADER_LEN = _HEADER.size
MAX_DATAGRAM = 1200


class MsgType(enum.IntEnum):
    HELLO = 1
    CHALLENGE = 2
    CONFIRM = 3
    ACK = 4
    GOODBYE = 5


class Reject(enum.Enum):
    """Why a datagram was refused; the agent counts these."""

    TRUNCATED = "truncated"
    OVERSIZED = "oversized"
    MAGIC = "bad-magic"
    VERSION = "wrong-version"
    TYPE = "unknown-type"
    LENGTH = "bad-length"
    MAC = "bad-mac"
    BODY = "bad-body"
    STALE = "stale"
    REPLAY = "replayed"
    PEER = "unexpected-peer"
    UNSOLICITED = "unsolicited"


class ProtocolError(ValueError):
    """A datagram that is not a valid message; ``reason`` says which check failed."""

    def __init__(self, reason: Reject, detail: str = "") -> None:
        self.reason = reason
        super().__init__(f"{reason.value}: {detail}" if detail else reason.value)


@dataclass(frozen=True)
class Endpoint:
    """An address and UDP port as one end saw it."""

    address: IPAddress
    port: int

    def __str__(self) -> str:
        if self.address.version == 6:
            return f"[{self.address}]:{self.port}"
        return f"{self.address}:{self.port}"


@dataclass(frozen=True)
class Hello:
    """``keepalive_ms`` and ``misses`` tell the pod end when to count the path as dead."""

    mtu: int
    networks: tuple[PodNetwork, ...]
    keepalive_ms: int = 5000
    misses: int = 3


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    observed: Endpoint


@dataclass(frozen=True)
class Confirm:
    nonce: bytes


@dataclass(frozen=True)
class Ack:
    observed: Endpoint
    mtu: int
    built: int


@dataclass(frozen=True)
class Goodbye:
    """External -> pod: remove every network and the port filter, then exit. Pod -> external: done."""


Body = Hello | Challenge | Confirm | Ack | Goodbye
_BODY_TYPES: dict[type, MsgType] = {
    Hello: MsgType.HELLO,
    Challenge: MsgType.CHALLENGE,
    Confirm: MsgType.CONFIRM,
    Ack: MsgType.ACK,
    Goodbye: MsgType.GOODBYE,
}


@dataclass(frozen=True)
class Message:
    """A decoded, authenticated message."""

    session: bytes
    counter: int
    timestamp_ms: int
    body: Body

    @property
    def type(self) -> MsgType:
        return _BODY_TYPES[type(self.body)]


# -- encoding -----------------------------------------------------------------


def hello_size(networks: Sequence[PodNetwork]) -> int:
    """The bytes of a hello datagram that carries ``networks``: at most MAX_DATAGRAM, or encode refuses it."""
    return HEADER_LEN + _HELLO.size + encoded_size(networks) + MAC_LEN


def _encode_endpoint(endpoint: Endpoint) -> bytes:
    packed = endpoint.address.packed.ljust(16, b"\0")
    return _ENDPOINT.pack(endpoint.address.version, packed, endpoint.port)


def _encode_body(body: Body) -> bytes:
    if isinstance(body, Hello):
        runs = pack_runs(body.networks)
        if len(runs) > MAX_RUNS:
            raise ValueError(
                f"the hello would take more than {MAX_DATAGRAM} bytes: its networks fall into {len(runs)} runs"
            )
        return _HELLO.pack(body.mtu, body.keepalive_ms, body.misses, len(runs)) + encode_runs(runs)
    if isinstance(body, Challenge):
        return body.nonce + _encode_endpoint(body.observed)
    if isinstance(body, Confirm):
        return body.nonce
    if isinstance(body, Goodbye):
        return b""
    return _encode_endpoint(body.observed) + _BUILT.pack(body.mtu, body.built)


def encode(message: Message, key: bytes) -> bytes:
    """Serialize and sign ``message``. Raises ValueError on out-of-range fields."""
    validate(message)
    body = _encode_body(message.body)
    header = _HEADER.pack(
        MAGIC,
        VERSION,
        message.type,
        len(body),
        message.session,
        message.counter,
        message.timestamp_ms,
    )
    signed = header + body
    if len(signed) + MAC_LEN > MAX_DATAGRAM:
        raise ValueError(
            f"the message takes {len(signed) + MAC_LEN} bytes, more than {MAX_DATAGRAM}: its networks fall into"
            " too many runs (see netcodec)"
        )
    return signed + _mac(key, signed)


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def validate(message: Message) -> None:
    """Check the field ranges that encode relies on."""
    if len(message.session) != SESSION_LEN:
        raise ValueError("session id must be 8 bytes")
    if not 0 <= message.counter < 2**64 or not 0 <= message.timestamp_ms < 2**64:
        raise ValueError("counter and timestamp must fit in 64 bits")
    body = message.body
    if isinstance(body, Hello):
        if not 1 <= len(body.networks) <= MAX_NETWORKS:
            raise ValueError(f"a hello carries 1 to {MAX_NETWORKS} networks")
        for net in body.networks:
            validate_network(net)
        if len({n.vni for n in body.networks}) != len(body.networks):
            raise ValueError("two networks of one hello share a VNI")
        if len({n.dev for n in body.networks}) != len(body.networks):
            raise ValueError("two networks of one hello share a device name")
        _validate_liveness(body.keepalive_ms, body.misses)
    if isinstance(body, (Challenge, Ack)) and not 0 <= body.observed.port <= 65535:
        raise ValueError(f"port {body.observed.port} is outside 0..65535")
    if isinstance(body, Ack) and not 0 <= body.built <= MAX_NETWORKS:
        raise ValueError(f"an ack reports 0 to {MAX_NETWORKS} networks built")
    if isinstance(body, (Challenge, Confirm)) and len(body.nonce) != NONCE_LEN:
        raise ValueError("nonce must be 16 bytes")
    if isinstance(body, (Hello, Ack)) and not 68 <= body.mtu <= 65535:
        raise ValueError("mtu must be 68..65535")


def _validate_liveness(keepalive_ms: int, misses: int) -> None:
    if not 10 <= keepalive_ms <= 3_600_000:
        raise ValueError(f"keepalive interval {keepalive_ms} ms is outside 10..3600000")
    if not 1 <= misses <= 100:
        raise ValueError(f"misses {misses} is outside 1..100")


# -- decoding -----------------------------------------------------------------


def decode(datagram: bytes, key: bytes) -> Message:
    """Authenticate and parse one datagram; raises ProtocolError only."""
    if len(datagram) < HEADER_LEN + MAC_LEN:
        raise ProtocolError(Reject.TRUNCATED, f"{len(datagram)} bytes")
    if len(datagram) > MAX_DATAGRAM:
        raise ProtocolError(Reject.OVERSIZED, f"{len(datagram)} bytes")
    magic, version, mtype, body_len, session, counter, stamp = _HEADER.unpack_from(datagram)
    if magic != MAGIC:
        raise ProtocolError(Reject.MAGIC)
    if version != VERSION:
        raise ProtocolError(Reject.VERSION, f"version {version}, expected {VERSION}")
    if mtype not in MsgType._value2member_map_:
        raise ProtocolError(Reject.TYPE, f"type {mtype}")
    if HEADER_LEN + body_len + MAC_LEN != len(datagram):
        raise ProtocolError(Reject.LENGTH, f"body length {body_len} for {len(datagram)} bytes")
    signed, mac = datagram[:-MAC_LEN], datagram[-MAC_LEN:]
    if not hmac.compare_digest(_mac(key, signed), mac):
        raise ProtocolError(Reject.MAC)
    body = _decode_body(MsgType(mtype), signed[HEADER_LEN:])
    return Message(session, counter, stamp, body)


def _decode_body(mtype: MsgType, raw: bytes) -> Body:
    try:
        if mtype is MsgType.HELLO:
            return _decode_hello(raw)
        if mtype is MsgType.CHALLENGE:
            _expect_len(raw, NONCE_LEN + _ENDPOINT.size)
            return Challenge(raw[:NONCE_LEN], _decode_endpoint(raw[NONCE_LEN:]))
        if mtype is MsgType.CONFIRM:
            _expect_len(raw, NONCE_LEN)
            return Confirm(raw)
        if mtype is MsgType.GOODBYE:
            _expect_len(raw, 0)
            return Goodbye()
        _expect_len(raw, _ENDPOINT.size + _BUILT.size)
        mtu, built = _BUILT.unpack_from(raw, _ENDPOINT.size)
        _check_mtu(mtu)
        if built > MAX_NETWORKS:
            raise ProtocolError(Reject.BODY, f"ack reports {built} networks built")
        return Ack(_decode_endpoint(raw[: _ENDPOINT.size]), mtu, built)
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        if isinstance(exc, ProtocolError):
            raise
        raise ProtocolError(Reject.BODY, str(exc)) from None


def _expect_len(raw: bytes, size: int) -> None:
    if len(raw) != size:
        raise ProtocolError(Reject.BODY, f"body of {len(raw)} bytes, expected {size}")


def _check_mtu(mtu: int) -> None:
    if mtu < 68:
        raise ProtocolError(Reject.BODY, f"mtu {mtu} below 68")


def _decode_hello(raw: bytes) -> Hello:
    if len(raw) < _HELLO.size:
        raise ProtocolError(Reject.BODY, "hello body too short")
    mtu, keepalive_ms, misses, runs = _HELLO.unpack_from(raw)
    _check_mtu(mtu)
    _validate_liveness(keepalive_ms, misses)  # a ValueError here becomes Reject.BODY
    if runs == 0:
        raise ProtocolError(Reject.BODY, "no networks")
    nets, size = decode_runs(raw[_HELLO.size :], runs)  # a struct.error or ValueError: Reject.BODY
    _expect_len(raw, _HELLO.size + size)
    return Hello(mtu, nets, keepalive_ms, misses)


def _decode_endpoint(raw: bytes) -> Endpoint:
    family, packed, port = _ENDPOINT.unpack(raw)
    if family == 4 and packed[4:] == bytes(12):
        return Endpoint(ipaddress.IPv4Address(packed[:4]), port)
    if family == 6:
        return Endpoint(ipaddress.IPv6Address(packed), port)
    raise ProtocolError(Reject.BODY, f"endpoint family {family}")


def peek_type(datagram: bytes) -> MsgType | None:
    """The claimed type of an unauthenticated datagram, for routing only."""
    if len(datagram) < HEADER_LEN or datagram[:4] != MAGIC:
        return None
    value = datagram[5]
    return MsgType(value) if value in MsgType._value2member_map_ else None
