"""Freshness and replay checks for authenticated handshake messages (pure logic)."""

from __future__ import annotations

from collections import OrderedDict

from .protocol import Message, ProtocolError, Reject

DEFAULT_MAX_SKEW_S = 120.0
_SESSIONS_REMEMBERED = 256


class ReplayGuard:
    """Accepts each (session, counter) once, in increasing order, within a time window.

    Each external end process has its own random session id and counts up, so a
    restarted external end is a new session, and a captured message can never be
    accepted twice. Memory is bounded: the oldest sessions are forgotten first;
    forgetting one lets nothing in that the time window does not also allow.
    """

    def __init__(self, max_skew_s: float = DEFAULT_MAX_SKEW_S) -> None:
        self.max_skew_ms = round(max_skew_s * 1000)
        self._highest: OrderedDict[bytes, int] = OrderedDict()

    def check(self, message: Message, now_ms: int) -> None:
        """Raise ProtocolError(STALE or REPLAY), or record the message as seen."""
        if abs(message.timestamp_ms - now_ms) > self.max_skew_ms:
            raise ProtocolError(Reject.STALE, f"timestamp {message.timestamp_ms - now_ms:+d} ms from now")
        last = self._highest.get(message.session)
        if last is not None and message.counter <= last:
            raise ProtocolError(Reject.REPLAY, f"counter {message.counter} <= {last}")
        self._highest[message.session] = message.counter
        self._highest.move_to_end(message.session)
        while len(self._highest) > _SESSIONS_REMEMBERED:
            self._highest.popitem(last=False)
