"""The report section's size bound: parts cut from the front, and room a short part leaves to the long ones."""

from __future__ import annotations

from pytest_svctunnel.diagnostics import render


def test_a_long_part_gets_the_room_short_parts_leave() -> None:
    events = "\n".join(f"event {i:04d} " + "x" * 90 for i in range(40))  # about 4000 characters
    text = render([("log", "one line"), ("pods", "one pod"), ("recent events", events)], limit=6000)
    assert "event 0000" in text and "..." not in text, "cut although the whole section is within the limit"


def test_each_part_is_cut_from_the_front_beyond_the_limit() -> None:
    long = "\n".join(f"line {i:04d}" for i in range(2000))
    text = render([("a", long), ("b", long)], limit=1000)
    assert text.count("...") == 2 and "line 1999" in text and "line 0000" not in text
    assert len(text) < 1100
