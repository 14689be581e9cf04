"""Bounded diagnostics for failing reports: what each end saw, kept short."""

from __future__ import annotations

from collections.abc import Sequence

from . import device

MAX_SECTION_CHARS = 6000


def local_links(prefix: str) -> str:
    """State and counters of this namespace's tunnel devices of one run."""
    states = [device.link_state(None, name) for name in device.links_with_prefix(None, prefix)]
    return "\n".join(s.render() for s in states if s) or "(no tunnel devices)"


def render(parts: Sequence[tuple[str, str]], limit: int = MAX_SECTION_CHARS) -> str:
    """Join titled parts; each is cut from the front so the newest lines survive. Room a short part
    does not use goes to the longer ones, so a long part (recent events) is not cut while the total
    is within ``limit``."""
    bodies = [text.strip() or "(empty)" for _, text in parts]
    out = []
    for (title, _), body, room in zip(parts, bodies, _rooms([len(b) for b in bodies], limit), strict=True):
        if len(body) > room:
            body = "..." + body[-room:]
        out.append(f"--- {title}\n{body}")
    return "\n".join(out)


def _rooms(lengths: list[int], limit: int) -> list[int]:
    """Each part's room: shortest first, each gets what it needs up to an even share of what is left
    (at least 200 characters)."""
    rooms = [0] * len(lengths)
    left = limit
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    for taken, index in enumerate(order):
        share = max(200, left // (len(order) - taken))
        rooms[index] = min(lengths[index], share)
        left -= rooms[index]
    return rooms


def safely(title: str, produce: object) -> tuple[str, str]:
    """Run a diagnostics producer; a failure becomes text, never an exception."""
    try:
        text = produce() if callable(produce) else str(produce)
    except Exception as exc:  # diagnostics must never hide the real failure
        text = f"(could not collect: {exc})"
    return title, str(text)
