"""A small rtnetlink codec and socket for bulk work: requests in batches, dumps parsed in a few fields.

pyroute2 serves every single request here; it costs about a millisecond and a half of Python per
request and more per dumped link, which an end with hundreds of networks cannot afford (measured:
18 ms per device with pyroute2's per-request API; the kernel itself builds 256 devices in 56 ms).
So ``linkbatch`` encodes its few message kinds with ``struct`` and sends them in batches over one
plain netlink socket; every answer is matched to its request by sequence number.
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import ipaddress
import os
import secrets
import socket
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import KernelError
from .shield import shield
from .waiting import Deadline

# message types and flags (linux/netlink.h, linux/rtnetlink.h)
NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_GETROUTE = 26
RTM_NEWNEIGH, RTM_DELNEIGH, RTM_GETNEIGH = 28, 29, 30
NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP = 0x1, 0x4, 0x300
NLM_F_EXCL, NLM_F_CREATE, NLM_F_APPEND = 0x200, 0x400, 0x800
# attributes
IFLA_IFNAME, IFLA_MTU, IFLA_STATS64, IFLA_LINKINFO, IFLA_GROUP = 3, 4, 23, 18, 27
IFLA_INFO_KIND, IFLA_INFO_DATA = 1, 2
VXLAN_ID, VXLAN_LINK, VXLAN_LOCAL, VXLAN_LEARNING, VXLAN_PORT_RANGE, VXLAN_PORT, VXLAN_LOCAL6 = 1, 3, 4, 7, 10, 15, 17
VXLAN_UDP_CSUM = 18
IFA_ADDRESS, IFA_LOCAL = 1, 2
NDA_DST, NDA_LLADDR, NDA_PORT = 1, 2, 6
RTA_DST = 1
RTN_LOCAL = 2
IFF_UP = 0x1
AF_BRIDGE = 7
NTF_SELF = 0x02
NUD_NOARP_PERMANENT = 0x40 | 0x80

_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence, port
_IFINFO = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # family, prefix length, flags, scope, index
_ND = struct.Struct("=BxxxiHBB")  # family, ifindex, state, flags, type
_RT = struct.Struct("=BBBBBBBBI")  # family, dst len, src len, tos, table, protocol, scope, type, flags
_ATTR = struct.Struct("=HH")
_CHUNK = 256  # requests per send, well inside the socket buffers with their answers
_ANSWER_S = 10.0


def attr(kind: int, payload: bytes) -> bytes:
    length = _ATTR.size + len(payload)
    return _ATTR.pack(length, kind) + payload + bytes(-length % 4)


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def be16(value: int) -> bytes:
    return struct.pack("!H", value)


def text(value: str) -> bytes:
    return value.encode("ascii") + b"\0"


def attrs(data: bytes) -> Iterator[tuple[int, bytes]]:
    """The (type, payload) attributes in ``data`` (the nested flag cleared)."""
    offset = 0
    while offset + _ATTR.size <= len(data):
        length, kind = _ATTR.unpack_from(data, offset)
        if length < _ATTR.size:
            return
        yield kind & 0x3FFF, data[offset + _ATTR.size : offset + length]
        offset += (length + 3) & ~3


@dataclass(frozen=True)
class Request:
    """One request (its type, flags and body; the header is added on sending) and, for the error
    that names it, what it does; ``ignore`` lists the errno values that mean "done already"."""

    kind: int
    flags: int
    body: bytes
    what: str
    ignore: frozenset[int] = frozenset()


def link_request(index: int, *, up: bool | None = None, extra: bytes = b"") -> bytes:
    """An ifinfomsg body: the link ``index`` (0: none), its up flag if given, then attributes."""
    change = IFF_UP if up is not None else 0
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, IFF_UP if up else 0, change) + extra


def address_body(index: int, address: ipaddress.IPv4Interface | ipaddress.IPv6Interface, flags: int) -> bytes:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    packed = address.ip.packed
    head = _IFADDR.pack(family, address.network.prefixlen, flags, 0, index)
    return head + attr(IFA_LOCAL, packed) + attr(IFA_ADDRESS, packed)


def fdb_body(index: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int | None) -> bytes:
    """A default forwarding entry to ``address``: at ``port``, or (None) at the device's own port."""
    head = _ND.pack(AF_BRIDGE, index, NUD_NOARP_PERMANENT, NTF_SELF, 0)
    body = head + attr(NDA_LLADDR, bytes(6)) + attr(NDA_DST, address.packed)
    return body + attr(NDA_PORT, be16(port)) if port is not None else body


@dataclass
class Link:
    """The fields of a dumped link that the bulk work needs."""

    index: int
    name: str = ""
    kind: str | None = None
    group: int = 0
    rx_packets: int = 0
    vxlan: dict[int, bytes] = field(default_factory=dict)  # IFLA_VXLAN_* -> raw payload


CLONE_NEWNET = 0x40000000
SO_RCVBUFFORCE = 33
NLM_F_DUMP_INTR = 0x10
_DUMP_TRIES = 5
_NETNS_DIR = "/run/netns"


def _socket_in(netns: str | None, family: int, kind: int, proto: int = 0) -> socket.socket:
    """A socket of ``netns`` (None: this thread's): the thread enters the namespace only while it
    makes the socket, which stays bound to that namespace."""
    if netns is None:
        return socket.socket(family, kind, proto)
    libc = ctypes.CDLL(None, use_errno=True)
    with open("/proc/thread-self/ns/net", "rb") as home, open(f"{_NETNS_DIR}/{netns}", "rb") as there:
        if libc.setns(there.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"entering network namespace {netns}")
        try:
            return socket.socket(family, kind, proto)
        finally:
            if libc.setns(home.fileno(), CLONE_NEWNET) != 0:  # never carry on in the wrong namespace
                os.abort()


def _route_socket(netns: str | None) -> socket.socket:
    """A NETLINK_ROUTE socket of ``netns`` (None: this thread's)."""
    return _socket_in(netns, socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)


SIOCETHTOOL = 0x8946
ETHTOOL_GTXCSUM, ETHTOOL_STXCSUM = 0x16, 0x17


def set_tx_checksums(netns: str | None, wanted: Mapping[str, bool]) -> None:
    """Turn each named device's transmit checksum offload on or off (the ioctl behind ``ethtool -K
    NAME tx on|off``), all through one socket of ``netns``."""
    with _socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for name, on in wanted.items():
            _ethtool(sock, name, ETHTOOL_STXCSUM, int(on))


def tx_checksum(netns: str | None, name: str) -> bool:
    """Whether device ``name`` leaves transmit checksums to later (offload)."""
    with _socket_in(netns, socket.AF_INET, socket.SOCK_DGRAM) as sock:
        return bool(_ethtool(sock, name, ETHTOOL_GTXCSUM, 0))


def _ethtool(sock: socket.socket, name: str, command: int, data: int) -> int:
    """One ``struct ethtool_value`` command on device ``name``; the value the kernel leaves in it."""
    value = array.array("I", [command, data])
    address, _ = value.buffer_info()  # the kernel reads and writes ``value`` through this address
    try:
        fcntl.ioctl(sock.fileno(), SIOCETHTOOL, struct.pack("16sP", name.encode(), address))
    except OSError as exc:
        raise OSError(exc.errno, f"{name}: {exc.strerror}") from None
    return value[1]


class Socket:
    """One NETLINK_ROUTE socket, in ``netns`` (None: this process's namespace)."""

    def __init__(self, netns: str | None = None) -> None:
        self.sock = _route_socket(netns)
        try:  # room for a whole batch's answers; beyond rmem_max needs CAP_NET_ADMIN, which we have
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 1 << 21)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        self.sock.bind((0, 0))
        self.sequence = secrets.randbelow(1 << 30)
        self.interrupted = False  # the last dump's answers said it changed while it ran

    def close(self) -> None:
        self.sock.close()

    def _frame(self, kind: int, flags: int, body: bytes) -> tuple[int, bytes]:
        self.sequence += 1
        return self.sequence, _HEADER.pack(_HEADER.size + len(body), kind, flags, self.sequence, 0) + body

    def run(self, requests: Sequence[Request]) -> None:
        """Send the requests in batches and check every answer; the first failure raises KernelError
        once every answer of its batch is in (nothing is left unread)."""
        for start in range(0, len(requests), _CHUNK):
            pending: dict[int, Request] = {}
            data = bytearray()
            for request in requests[start : start + _CHUNK]:
                sequence, frame = self._frame(request.kind, request.flags | NLM_F_REQUEST | NLM_F_ACK, request.body)
                pending[sequence] = request
                data += frame
            try:
                self.sock.sendall(bytes(data))
            except OSError as exc:
                raise KernelError(f"sending {len(pending)} netlink request(s): {exc}") from None
            failures = self._acks(pending)
            if failures:
                request, code = failures[0]
                more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
                raise KernelError(f"{request.what}: {os.strerror(code)}{more}")

    def _acks(self, pending: dict[int, Request]) -> list[tuple[Request, int]]:
        failures = []
        deadline = Deadline.after(_ANSWER_S)
        while pending:
            for kind, sequence, payload in self._receive(deadline, len(pending)):
                if kind == NLMSG_ERROR and sequence in pending:
                    code = -struct.unpack_from("=i", payload)[0]
                    request = pending.pop(sequence)
                    if code and code not in request.ignore:
                        failures.append((request, code))
        return failures

    def _receive(self, deadline: Deadline, waiting: int) -> Iterator[tuple[int, int, bytes]]:
        self.sock.settimeout(max(deadline.remaining(), 0.01))
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            raise KernelError(f"the kernel answered none of {waiting} netlink request(s) in {_ANSWER_S:g} s") from None
        except OSError as exc:  # ENOBUFS: answers were lost
            raise KernelError(f"reading the kernel's netlink answers: {exc}") from None
        offset = 0
        while offset + _HEADER.size <= len(data):
            length, kind, flags, sequence, _port = _HEADER.unpack_from(data, offset)
            if flags & NLM_F_DUMP_INTR:
                self.interrupted = True
            yield kind, sequence, data[offset + _HEADER.size : offset + length]
            offset += max((length + 3) & ~3, _HEADER.size)

    def dump(self, kind: int, body: bytes) -> list[bytes]:
        """The payloads of every message a dump request answers with; a dump that the kernel says
        changed while it ran (NLM_F_DUMP_INTR) is taken again."""
        for _ in range(_DUMP_TRIES):
            self.interrupted = False
            out = self._dump_once(kind, body)
            if not self.interrupted:
                return out
        raise KernelError(f"netlink dump {kind} kept changing while it ran ({_DUMP_TRIES} tries)")

    def _dump_once(self, kind: int, body: bytes) -> list[bytes]:
        sequence, frame = self._frame(kind, NLM_F_REQUEST | NLM_F_DUMP, body)
        try:
            self.sock.sendall(frame)
        except OSError as exc:
            raise KernelError(f"sending netlink dump {kind}: {exc}") from None
        deadline, out = Deadline.after(_ANSWER_S), list[bytes]()
        while True:
            for answer, answered, payload in self._receive(deadline, 1):
                if answered != sequence:
                    continue
                if answer in (NLMSG_DONE, NLMSG_ERROR):
                    code = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if code:
                        raise KernelError(f"netlink dump {kind}: {os.strerror(code)}")
                    return out
                out.append(payload)

    def links(self) -> dict[str, Link]:
        """Every link of the namespace by name."""
        found = {}
        for payload in self.dump(RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            link = _parse_link(payload)
            found[link.name] = link
        return found

    def addresses(self) -> list[tuple[int, ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
        """Every address of the namespace: the index of its link, and the address with its prefix."""
        found = []
        for payload in self.dump(RTM_GETADDR, _IFADDR.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            _family, prefix, _flags, _scope, index = _IFADDR.unpack_from(payload)
            fields = dict(attrs(payload[_IFADDR.size :]))
            raw = fields.get(IFA_LOCAL) or fields.get(IFA_ADDRESS)
            if raw is not None and len(raw) in (4, 16):
                found.append((index, ipaddress.ip_interface((ipaddress.ip_address(raw), prefix))))
        return found

    def local_addresses(self) -> set[str]:
        """The addresses that route as local here (the local routing table)."""
        found = set()
        for family in (socket.AF_INET, socket.AF_INET6):
            for payload in self.dump(RTM_GETROUTE, _RT.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
                head = _RT.unpack_from(payload)
                if head[7] != RTN_LOCAL:
                    continue
                for kind, value in attrs(payload[_RT.size :]):
                    if kind == RTA_DST:
                        found.add(str(ipaddress.ip_address(value)))
        return found

    def zero_entries(
        self, indexes: set[int]
    ) -> list[tuple[int, ipaddress.IPv4Address | ipaddress.IPv6Address, int | None]]:
        """The default (all-zero MAC) forwarding entries of the links ``indexes``: index, address, and
        port (None: the device's own, which the kernel leaves out of the dump)."""
        out = []
        for payload in self.dump(RTM_GETNEIGH, _ND.pack(AF_BRIDGE, 0, 0, 0, 0)):
            _family, index, _state, _flags, _type = _ND.unpack_from(payload)
            if index not in indexes:
                continue
            fields = dict(attrs(payload[_ND.size :]))
            dst, mac = fields.get(NDA_DST), fields.get(NDA_LLADDR)
            if dst and mac == bytes(6):
                port = struct.unpack("!H", fields[NDA_PORT])[0] if NDA_PORT in fields else None
                out.append((index, ipaddress.ip_address(dst), port))
        return out


def _parse_link(payload: bytes) -> Link:
    _family, _type, index, _flags, _change = _IFINFO.unpack_from(payload)
    link = Link(index)
    for kind, value in attrs(payload[_IFINFO.size :]):
        if kind == IFLA_IFNAME:
            link.name = value.rstrip(b"\0").decode("ascii", "replace")
        elif kind == IFLA_GROUP:
            link.group = struct.unpack_from("=I", value)[0]
        elif kind == IFLA_STATS64:
            link.rx_packets = struct.unpack_from("=Q", value)[0]
        elif kind == IFLA_LINKINFO:
            for inner, data in attrs(value):
                if inner == IFLA_INFO_KIND:
                    link.kind = data.rstrip(b"\0").decode("ascii", "replace")
                elif inner == IFLA_INFO_DATA:
                    link.vxlan = dict(attrs(data))
    return link


@contextmanager
def opened(netns: str | None) -> Iterator[Socket]:
    """A socket for bulk work in ``netns`` (None: here); Ctrl-C, SIGTERM and alarms wait until it is
    closed (see shield)."""
    with shield():
        try:
            sock = Socket(netns)
        except OSError as exc:
            raise KernelError(f"cannot open a netlink socket in {netns or 'this namespace'}: {exc}") from None
        try:
            yield sock
        finally:
            sock.close()
