"""Ending a pod end from outside: an authenticated GOODBYE, retransmitted until the agent says
goodbye back (it has then removed its devices and its port filter, and exits) or the deadline.

It needs no tunnel and no state of the session that built one: the key and the Service address
are enough, so a teardown, ``svctunnel goodbye`` and a reaper after a killed session all end an
agent the same way. The first datagram opens a flow of its own through every NAT on the way.
"""

from __future__ import annotations

import logging
import secrets
import socket
import time

from .protocol import Endpoint, Goodbye, Message, ProtocolError, decode, encode
from .waiting import Deadline

log = logging.getLogger("svctunnel.goodbye")

RETRANSMIT_S = 0.25


def say_goodbye(service: Endpoint, key: bytes, deadline: Deadline) -> bool:
    """True once the agent behind ``service`` answered the goodbye; False if nothing answered by the
    deadline (the agent is gone already, or nothing forwards to it)."""
    family = socket.AF_INET if service.address.version == 4 else socket.AF_INET6
    session, sent = secrets.token_bytes(8), set[int]()
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        while not deadline.expired():
            counter = len(sent) + 1
            sent.add(counter)
            message = Message(session, counter, int(time.time() * 1000), Goodbye())
            sock.sendto(encode(message, key), (str(service.address), service.port))
            if _answered(sock, key, session, sent, min(RETRANSMIT_S, deadline.remaining())):
                log.info("goodbye: the agent behind %s has removed everything and exits", service)
                return True
    return False


def _answered(sock: socket.socket, key: bytes, session: bytes, sent: set[int], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except (TimeoutError, ConnectionRefusedError):
            continue
        try:
            reply = decode(data, key)
        except ProtocolError:
            continue
        if reply.session == session and reply.counter in sent and isinstance(reply.body, Goodbye):
            return True
    return False
