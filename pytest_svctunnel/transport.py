"""Sockets for handshake traffic on a port the kernel's VXLAN device owns.

The pod end's VXLAN socket holds the tunnel port, so the agent cannot bind it.
It reads hellos from an AF_PACKET socket whose kernel filter passes only
handshake datagrams, and answers through a raw UDP socket with the tunnel
port as source, so the answer follows the flow the hello opened.
"""

from __future__ import annotations

import ctypes
import select
import socket
import struct
from types import TracebackType

from .errors import KernelError, PrivilegeError
from .packets import ETH_P_IP, ETH_P_IPV6, UdpDatagram, build_udp, hello_filter, parse_udp
from .protocol import Endpoint

SO_ATTACH_FILTER = 26
_RECV_SIZE = 4096


def _family(endpoint: Endpoint) -> socket.AddressFamily:
    return socket.AF_INET if endpoint.address.version == 4 else socket.AF_INET6


class HelloTap:
    """Receives handshake datagrams addressed to ``port``, on one interface or all.

    One packet socket per IP version, bound to that protocol rather than to every protocol: the
    kernel hands such sockets a packet only after the interface's ingress hook, so the agent's
    ingress rate limit (``nft.hello_limit``) drops a stranger's flood before it costs user space.
    """

    def __init__(self, port: int, ifname: str | None = None) -> None:
        self._socks: list[socket.socket] = []
        self._programs: list[ctypes.Array[ctypes.c_char]] = []  # the kernel copied them; kept with the sockets
        try:
            for protocol in (ETH_P_IP, ETH_P_IPV6):
                self._socks.append(self._open(port, protocol, ifname))
        except BaseException:
            self.close()
            raise

    def _open(self, port: int, protocol: int, ifname: str | None) -> socket.socket:
        try:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(protocol))
        except PermissionError:
            raise PrivilegeError("opening the hello socket needs CAP_NET_RAW; give the agent NET_RAW") from None
        try:
            self._programs.append(_attach_filter(sock, port))
            if ifname:
                sock.bind((ifname, protocol))
        except OSError as exc:
            sock.close()
            on = f" on {ifname}" if ifname else ""
            raise KernelError(f"cannot listen for hellos{on}: {exc.strerror or exc}; check --underlay-dev") from None
        _drain(sock)
        sock.setblocking(False)
        return sock

    def receive(self, timeout: float) -> UdpDatagram | None:
        """The next handshake datagram, or None after ``timeout`` seconds."""
        ready, _, _ = select.select(self._socks, [], [], max(timeout, 0.0))
        for sock in ready:
            try:
                packet = sock.recv(_RECV_SIZE)
            except BlockingIOError:
                continue
            return parse_udp(packet)
        return None

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks.clear()

    def __enter__(self) -> HelloTap:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _drain(sock: socket.socket) -> None:
    """Packets queued before the filter was attached passed no filter: drop them."""
    sock.setblocking(False)
    try:
        while True:
            sock.recv(_RECV_SIZE)
    except BlockingIOError:
        pass


def _attach_filter(sock: socket.socket, port: int) -> ctypes.Array[ctypes.c_char]:
    insns = hello_filter(port)
    program = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in insns))
    fprog = struct.pack("HL", len(insns), ctypes.addressof(program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
    return program  # the kernel copied it, but keep the buffer alive with the socket


def send_raw_udp(source: Endpoint, destination: Endpoint, payload: bytes) -> None:
    """Send one UDP datagram from ``source`` (which may be a port a VXLAN device owns)."""
    family = _family(source)
    try:
        sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_UDP)
    except PermissionError:
        raise PrivilegeError("sending handshake answers needs CAP_NET_RAW; give the agent NET_RAW") from None
    with sock:
        sock.bind((str(source.address), 0))
        sock.sendto(build_udp(source, destination, payload), (str(destination.address), 0))
