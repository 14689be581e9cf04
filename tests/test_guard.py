"""ReplayGuard: each (session, counter) once and in order, within the time window, in bounded memory."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_svctunnel.guard import DEFAULT_MAX_SKEW_S, ReplayGuard
from pytest_svctunnel.protocol import Confirm, Message, ProtocolError, Reject

NOW = 1_700_000_000_000
REMEMBERED = 256
SESSION_A = b"AAAAAAAA"
SESSION_B = b"BBBBBBBB"


def msg(counter: int, *, session: bytes = SESSION_A, stamp: int = NOW) -> Message:
    return Message(session, counter, stamp, Confirm(bytes(16)))


def sid(i: int) -> bytes:
    return i.to_bytes(8, "big")


def rejected(guard: ReplayGuard, message: Message, now: int = NOW) -> Reject | None:
    try:
        guard.check(message, now)
    except ProtocolError as exc:
        return exc.reason
    return None


def test_accepts_increasing_counters() -> None:
    guard = ReplayGuard()
    for counter in (0, 1, 2, 10, 11, 2**64 - 1):
        guard.check(msg(counter), NOW)


@pytest.mark.parametrize("counter", [5, 4, 1, 0], ids=["equal", "one-lower", "lower", "zero"])
def test_rejects_equal_or_lower_counter(counter: int) -> None:
    guard = ReplayGuard()
    guard.check(msg(5), NOW)
    with pytest.raises(ProtocolError) as info:
        guard.check(msg(counter), NOW)
    assert info.value.reason is Reject.REPLAY
    assert str(counter) in str(info.value)


def test_exact_replay_of_the_same_message_is_rejected() -> None:
    guard = ReplayGuard()
    m = msg(1)
    guard.check(m, NOW)
    assert rejected(guard, m) is Reject.REPLAY
    assert rejected(guard, m, NOW + 1000) is Reject.REPLAY


def test_a_rejected_message_does_not_move_the_watermark() -> None:
    guard = ReplayGuard(max_skew_s=1.0)
    guard.check(msg(5), NOW)
    assert rejected(guard, msg(3)) is Reject.REPLAY
    assert rejected(guard, msg(4)) is Reject.REPLAY  # still 5, not 3
    assert rejected(guard, msg(100, stamp=NOW + 1001)) is Reject.STALE
    guard.check(msg(6), NOW)  # the stale 100 was not recorded


def test_sessions_are_independent() -> None:
    guard = ReplayGuard()
    guard.check(msg(100, session=SESSION_A), NOW)
    guard.check(msg(1, session=SESSION_B), NOW)
    guard.check(msg(101, session=SESSION_A), NOW)
    guard.check(msg(2, session=SESSION_B), NOW)
    assert rejected(guard, msg(2, session=SESSION_B)) is Reject.REPLAY
    assert rejected(guard, msg(101, session=SESSION_A)) is Reject.REPLAY
    guard.check(msg(3, session=SESSION_B), NOW)


SKEW = {
    "exactly-max-ahead": (1000, None),
    "exactly-max-behind": (-1000, None),
    "one-ms-over-ahead": (1001, Reject.STALE),
    "one-ms-over-behind": (-1001, Reject.STALE),
    "now": (0, None),
    "far-future": (10**9, Reject.STALE),
    "far-past": (-(10**9), Reject.STALE),
}


@pytest.mark.parametrize(("offset", "expected"), SKEW.values(), ids=SKEW.keys())
def test_time_window_boundary(offset: int, expected: Reject | None) -> None:
    guard = ReplayGuard(max_skew_s=1.0)
    assert guard.max_skew_ms == 1000
    assert rejected(guard, msg(1, stamp=NOW + offset)) is expected


@pytest.mark.parametrize(
    ("max_skew_s", "max_skew_ms"),
    [(DEFAULT_MAX_SKEW_S, 120_000), (1.0, 1000), (0.5, 500), (0.0, 0), (3600.0, 3_600_000), (1.001, 1001)],
    ids=["default", "one-second", "half-second", "zero", "hour", "millisecond-precision"],
)
def test_default_and_custom_window(max_skew_s: float, max_skew_ms: int) -> None:
    guard = ReplayGuard(max_skew_s)
    assert guard.max_skew_ms == max_skew_ms
    assert rejected(guard, msg(1, stamp=NOW + max_skew_ms)) is None
    assert rejected(guard, msg(2, stamp=NOW - max_skew_ms)) is None
    assert rejected(guard, msg(3, stamp=NOW + max_skew_ms + 1)) is Reject.STALE
    assert rejected(guard, msg(4, stamp=NOW - max_skew_ms - 1)) is Reject.STALE


def test_default_window_is_two_minutes() -> None:
    guard = ReplayGuard()
    assert rejected(guard, msg(1, stamp=NOW - 120_000)) is None
    assert rejected(guard, msg(2, stamp=NOW + 120_001)) is Reject.STALE


def test_stale_is_checked_before_replay() -> None:
    guard = ReplayGuard(max_skew_s=1.0)
    guard.check(msg(5), NOW)
    assert rejected(guard, msg(5, stamp=NOW - 5000)) is Reject.STALE


def test_oldest_session_is_forgotten_after_256() -> None:
    guard = ReplayGuard()
    for i in range(REMEMBERED):
        guard.check(msg(10, session=sid(i)), NOW)
    # All 256 still remembered.
    assert rejected(guard, msg(10, session=sid(0))) is Reject.REPLAY
    assert rejected(guard, msg(10, session=sid(REMEMBERED - 1))) is Reject.REPLAY
    guard.check(msg(10, session=sid(REMEMBERED)), NOW)  # the 257th
    # Session 0 was the oldest: forgotten, so its counter starts afresh; session 1 is still known.
    assert rejected(guard, msg(1, session=sid(0))) is None
    assert rejected(guard, msg(10, session=sid(2))) is Reject.REPLAY


def test_recently_used_session_is_kept_and_the_least_recent_dropped() -> None:
    guard = ReplayGuard()
    for i in range(REMEMBERED):
        guard.check(msg(10, session=sid(i)), NOW)
    guard.check(msg(11, session=sid(0)), NOW)  # session 0 becomes the most recent
    guard.check(msg(10, session=sid(REMEMBERED)), NOW)  # evicts session 1, not 0
    assert rejected(guard, msg(11, session=sid(0))) is Reject.REPLAY
    assert rejected(guard, msg(1, session=sid(1))) is None


def test_memory_never_grows_past_256_sessions() -> None:
    guard = ReplayGuard()
    for i in range(3 * REMEMBERED):
        guard.check(msg(1, session=sid(i)), NOW)
        assert len(guard._highest) == min(i + 1, REMEMBERED)
    assert set(guard._highest) == {sid(i) for i in range(2 * REMEMBERED, 3 * REMEMBERED)}


def test_rejected_messages_do_not_take_memory() -> None:
    guard = ReplayGuard(max_skew_s=1.0)
    for i in range(10):
        assert rejected(guard, msg(1, session=sid(i), stamp=NOW + 5000)) is Reject.STALE
    assert len(guard._highest) == 0


@given(
    st.integers(0, 10),
    st.lists(
        st.tuples(st.sampled_from([SESSION_A, SESSION_B, b"CCCCCCCC"]), st.integers(0, 20), st.integers(-1500, 1500)),
        max_size=60,
    ),
)
def test_property_matches_a_simple_model(skew_s: int, events: list[tuple[bytes, int, int]]) -> None:
    """With few sessions (nothing forgotten): accepted iff inside the window and above the session's highest."""
    guard = ReplayGuard(max_skew_s=skew_s / 10)
    window = skew_s * 100
    highest: dict[bytes, int] = {}
    for session, counter, offset in events:
        if abs(offset) > window:
            expected: Reject | None = Reject.STALE
        elif session in highest and counter <= highest[session]:
            expected = Reject.REPLAY
        else:
            expected = None
            highest[session] = counter
        assert rejected(guard, msg(counter, session=session, stamp=NOW + offset)) is expected


@given(st.lists(st.tuples(st.integers(0, 600), st.integers(0, 3)), max_size=800))
def test_property_memory_bounded(events: list[tuple[int, int]]) -> None:
    guard = ReplayGuard()
    for session, counter in events:
        rejected(guard, msg(counter, session=sid(session)))
        assert len(guard._highest) <= REMEMBERED
