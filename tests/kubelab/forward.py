"""A TCP forwarder from 127.0.0.1 inside a named network namespace to a loopback port of this namespace.

kube-proxy runs inside a lab node namespace, but the API server listens on 127.0.0.1 here. A socket keeps the
namespace it was created in, so a short-lived thread enters the node namespace (``setns``, which only moves the
calling thread), creates the listening socket there and goes back; every other socket, and so every upstream
connection, is made by threads that never left this namespace.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from pytest_svctunnel.errors import LabError
from pytest_svctunnel.waiting import Deadline

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
_THREAD_NS = "/proc/thread-self/ns/net"  # not /proc/self: that is the main thread's, whatever this thread did
_SETNS_TIMEOUT_S = 5.0
_ACCEPT_POLL_S = 0.2  # how soon the accept loop notices close()
_CONNECT_TIMEOUT_S = 5.0
_CHUNK = 65536

_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def socket_in_netns(netns: str, kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
    """A new IPv4 socket that belongs to network namespace ``netns`` (a name under /run/netns).

    Whatever it binds to or connects to later is looked up in that namespace, whichever thread does it."""
    outcome: list[socket.socket | BaseException] = []
    worker = threading.Thread(target=_make_socket, args=(netns, kind, outcome), name=f"setns-{netns}", daemon=True)
    worker.start()
    worker.join(_SETNS_TIMEOUT_S)
    if worker.is_alive() or not outcome:
        raise LabError(f"creating a socket in network namespace {netns} did not finish within {_SETNS_TIMEOUT_S:g} s")
    result = outcome[0]
    if isinstance(result, BaseException):
        raise LabError(
            f"creating a socket in network namespace {netns}: {result}; does {NETNS_DIR / netns} exist, "
            "and does this process run as root?"
        ) from result
    return result


def _make_socket(netns: str, kind: socket.SocketKind, outcome: list[socket.socket | BaseException]) -> None:
    """Runs in a thread of its own: enter ``netns``, create the socket, return to the original namespace."""
    try:
        home = os.open(_THREAD_NS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            target = os.open(NETNS_DIR / netns, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(target)
                try:
                    sock = socket.socket(socket.AF_INET, kind)
                finally:
                    _setns(home)
            finally:
                os.close(target)
        finally:
            os.close(home)
    except BaseException as exc:
        outcome.append(exc)
        return
    outcome.append(sock)


def free_ports_in(netns: str, count: int) -> list[int]:
    """``count`` different TCP ports on 127.0.0.1 that are free inside ``netns`` right now."""
    probes = [socket_in_netns(netns) for _ in range(count)]
    try:
        for probe in probes:  # all bound at once, so no port comes back twice
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class _Splice:
    """One forwarded connection: two sockets and the two threads that copy between them."""

    def __init__(self, inside: socket.socket, outside: socket.socket, on_closed: Callable[[_Splice], None]) -> None:
        self.sockets = (inside, outside)
        self._open_directions = 2
        self._lock = threading.Lock()
        self._on_closed = on_closed

    def pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(_CHUNK):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # pass the half-close on; TLS peers then close their side
            self._direction_done()

    def _direction_done(self) -> None:
        with self._lock:
            self._open_directions -= 1
            last = self._open_directions == 0
        if last:
            for sock in self.sockets:
                sock.close()
            self._on_closed(self)

    def shut(self) -> None:
        """Wake both pumps; they close the sockets on their way out."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class NetnsForwarder:
    """Listens on 127.0.0.1:``port`` inside ``netns``; each connection is spliced to ``target`` in this namespace.

    Threads are daemons; ``close()`` stops accepting, ends every connection and joins the threads (bounded)."""

    def __init__(self, netns: str, target: tuple[str, int]) -> None:
        self.netns = netns
        self.target = target
        self._listener: socket.socket | None = None
        self._closing = threading.Event()
        self._lock = threading.Lock()
        self._splices: set[_Splice] = set()
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        if self._listener is None:
            raise LabError(f"the forwarder into {self.netns} is not listening; call start() first")
        port: int = self._listener.getsockname()[1]
        return port

    def start(self) -> int:
        """Listen inside the namespace (on a free port) and start accepting; returns the port."""
        listener = socket_in_netns(self.netns)
        try:
            listener.bind(("127.0.0.1", 0))
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise LabError(
                f"listening on 127.0.0.1 inside network namespace {self.netns}: {exc}; "
                f"is loopback up there? (ip -n {self.netns} link set lo up)"
            ) from None
        listener.settimeout(_ACCEPT_POLL_S)
        self._listener = listener
        self._spawn(self._accept_loop, "accept")
        return self.port

    def _spawn(self, target: Callable[..., None], role: str, *args: object) -> None:
        thread = threading.Thread(target=target, args=args, name=f"forward-{self.netns}-{role}", daemon=True)
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()]
            self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._closing.is_set():
            try:
                inside, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._closing.is_set():
                    return
                continue  # a connection that died before we took it, or a transient shortage of descriptors
            self._splice(inside)

    def _splice(self, inside: socket.socket) -> None:
        inside.settimeout(None)
        try:
            outside = socket.create_connection(self.target, timeout=_CONNECT_TIMEOUT_S)
        except OSError:
            inside.close()  # the client sees a reset, as if nothing listened; it retries on its own
            return
        outside.settimeout(None)
        splice = _Splice(inside, outside, self._forget)
        with self._lock:
            if self._closing.is_set():
                inside.close()
                outside.close()
                return
            self._splices.add(splice)
        self._spawn(splice.pump, "in", inside, outside)
        self._spawn(splice.pump, "out", outside, inside)

    def _forget(self, splice: _Splice) -> None:
        with self._lock:
            self._splices.discard(splice)

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting and end every connection; safe to call twice. Threads get ``timeout`` s to finish."""
        deadline = Deadline.after(timeout)
        self._closing.set()
        with self._lock:
            splices = list(self._splices)
            threads = list(self._threads)
        for splice in splices:
            splice.shut()
        for thread in threads:
            thread.join(deadline.remaining())
        if self._listener is not None:
            self._listener.close()  # after the accept loop has left it, so no thread sits in accept() on a dead fd
        for splice in splices:
            for sock in splice.sockets:
                sock.close()
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            raise LabError(f"forwarder threads still running {timeout:g} s after close(): {', '.join(stuck)}")
