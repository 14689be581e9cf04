"""Pure packet helpers: parse received IP/UDP, build UDP headers, the hello tap's filter.

The hello tap sees whole L3 packets (an AF_PACKET socket), and handshake answers
leave through raw sockets, so the UDP layer is ours to read and write.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from .protocol import MAGIC, Endpoint

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
IPPROTO_UDP = 17
PACKET_HOST = 0

_UDP = struct.Struct("!HHHH")


@dataclass(frozen=True)
class UdpDatagram:
    """A UDP datagram with the addresses it arrived with."""

    source: Endpoint
    destination: Endpoint
    payload: bytes


def parse_udp(packet: bytes) -> UdpDatagram | None:
    """Parse an IPv4 or IPv6 packet carrying UDP; None for anything else."""
    if not packet:
        return None
    version = packet[0] >> 4
    if version == 4:
        return _parse_udp4(packet)
    if version == 6:
        return _parse_udp6(packet)
    return None


def _parse_udp4(packet: bytes) -> UdpDatagram | None:
    if len(packet) < 20:
        return None
    ihl = (packet[0] & 0x0F) * 4
    total = struct.unpack_from("!H", packet, 2)[0]
    frag = struct.unpack_from("!H", packet, 6)[0]
    if ihl < 20 or packet[9] != IPPROTO_UDP or frag & 0x3FFF or total > len(packet):
        return None
    src = ipaddress.IPv4Address(packet[12:16])
    dst = ipaddress.IPv4Address(packet[16:20])
    return _parse_udp_at(packet[:total], ihl, src, dst)


def _parse_udp6(packet: bytes) -> UdpDatagram | None:
    if len(packet) < 40 or packet[6] != IPPROTO_UDP:
        return None
    payload_len = struct.unpack_from("!H", packet, 4)[0]
    if 40 + payload_len > len(packet):
        return None
    src = ipaddress.IPv6Address(packet[8:24])
    dst = ipaddress.IPv6Address(packet[24:40])
    return _parse_udp_at(packet[: 40 + payload_len], 40, src, dst)


def _parse_udp_at(
    packet: bytes,
    offset: int,
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> UdpDatagram | None:
    if len(packet) < offset + _UDP.size:
        return None
    sport, dport, length, _ = _UDP.unpack_from(packet, offset)
    if length < _UDP.size or offset + length > len(packet):
        return None
    payload = packet[offset + _UDP.size : offset + length]
    return UdpDatagram(Endpoint(src, sport), Endpoint(dst, dport), payload)


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = int(sum(struct.unpack(f"!{len(data) // 2}H", data)))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def build_udp(source: Endpoint, destination: Endpoint, payload: bytes) -> bytes:
    """A UDP header plus payload with a correct checksum over the pseudo-header."""
    if source.address.version != destination.address.version:
        raise ValueError("source and destination must be of one address family")
    length = _UDP.size + len(payload)
    header = _UDP.pack(source.port, destination.port, length, 0)
    if source.address.version == 4:
        pseudo = source.address.packed + destination.address.packed + struct.pack("!BBH", 0, IPPROTO_UDP, length)
    else:
        pseudo = source.address.packed + destination.address.packed + struct.pack("!I3xB", length, IPPROTO_UDP)
    checksum = _checksum(pseudo + header + payload) or 0xFFFF
    return _UDP.pack(source.port, destination.port, length, checksum) + payload


# -- classic BPF --------------------------------------------------------------
# Opcodes from linux/filter.h.
_LD_W_ABS, _LD_H_ABS, _LD_B_ABS = 0x20, 0x28, 0x30
_LD_H_IND, _LD_W_IND = 0x48, 0x40
_LDX_B_MSH, _LDX_IMM = 0xB1, 0x01
_JEQ_K, _JSET_K = 0x15, 0x45
_RET_K = 0x06
_AD = 0xFFFFF000  # SKF_AD_OFF as an unsigned 32-bit offset
_SKF_AD_PROTOCOL = 0
_SKF_AD_PKTTYPE = 4

Insn = tuple[int, int, int, int]
# (label or "", opcode, jump-if-true label, jump-if-false label, k)
_Src = tuple[str, int, str, str, int]


def assemble(source: list[_Src]) -> list[Insn]:
    """Resolve labels into cBPF's forward jump offsets."""
    where = {label: i for i, (label, *_rest) in enumerate(source) if label}

    def offset(i: int, label: str) -> int:
        if not label:
            return 0
        delta = where[label] - i - 1
        if not 0 <= delta <= 255:
            raise ValueError(f"jump to {label} from {i} is not a short forward jump")
        return delta

    return [(op, offset(i, jt), offset(i, jf), k) for i, (_, op, jt, jf, k) in enumerate(source)]


def hello_filter(port: int) -> list[Insn]:
    """cBPF for an AF_PACKET/SOCK_DGRAM socket: pass only incoming, unfragmented UDP
    to ``port`` whose payload starts with the protocol magic, IPv4 or IPv6.

    Everything else, above all the tunnel's data, never reaches user space.
    """
    magic = struct.unpack("!I", MAGIC)[0]
    return assemble(
        [
            ("", _LD_W_ABS, "", "", _AD + _SKF_AD_PKTTYPE),
            ("", _JEQ_K, "proto", "drop", PACKET_HOST),
            ("proto", _LD_W_ABS, "", "", _AD + _SKF_AD_PROTOCOL),
            ("", _JEQ_K, "v4", "not4", ETH_P_IP),
            ("not4", _JEQ_K, "v6", "drop", ETH_P_IPV6),
            ("v4", _LD_B_ABS, "", "", 9),
            ("", _JEQ_K, "v4udp", "drop", IPPROTO_UDP),
            ("v4udp", _LD_H_ABS, "", "", 6),
            ("", _JSET_K, "drop", "v4hdr", 0x3FFF),
            ("v4hdr", _LDX_B_MSH, "", "", 0),
            ("", _LD_H_IND, "", "", 2),
            ("", _JEQ_K, "magic", "drop", port),
            ("v6", _LD_B_ABS, "", "", 6),
            ("", _JEQ_K, "v6udp", "drop", IPPROTO_UDP),
            ("v6udp", _LDX_IMM, "", "", 40),
            ("", _LD_H_IND, "", "", 2),
            ("", _JEQ_K, "magic", "drop", port),
            ("magic", _LD_W_IND, "", "", 8),
            ("", _JEQ_K, "accept", "drop", magic),
            ("accept", _RET_K, "", "", 0x40000),
            ("drop", _RET_K, "", "", 0),
        ]
    )
