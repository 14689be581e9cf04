"""ICMP echo over one device: proof that a tunnel network carries traffic."""

from __future__ import annotations

import os
import select
import socket
import struct
import time

from .packets import _checksum
from .values import IPAddress

_ECHO = {4: (8, 0), 6: (128, 129)}  # request type, reply type
_REPLY = {4: 0, 6: 129}


def ping_once(dev: str, address: IPAddress, timeout: float, size: int = 56) -> bool:
    """Send one echo request out of ``dev`` to ``address``; True if a reply came back in time."""
    version = address.version
    family, proto = (socket.AF_INET, socket.IPPROTO_ICMP) if version == 4 else (socket.AF_INET6, socket.IPPROTO_ICMPV6)
    ident = (os.getpid() ^ int(time.monotonic() * 1000)) & 0xFFFF
    payload = bytes(size)
    header = struct.pack("!BBHHH", _ECHO[version][0], 0, 0, ident, 1)
    if version == 4:  # the kernel fills in ICMPv6 checksums itself
        header = struct.pack("!BBHHH", 8, 0, _checksum(header + payload), ident, 1)
    with socket.socket(family, socket.SOCK_RAW, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
        sock.sendto(header + payload, (str(address), 0))
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                return False
            data, _source = sock.recvfrom(65535)
            icmp = data[(data[0] & 0x0F) * 4 :] if version == 4 else data
            if len(icmp) >= 8 and icmp[0] == _REPLY[version] and struct.unpack_from("!H", icmp, 4)[0] == ident:
                return True
    return False
