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
    """Join titled parts; each is cut from the front so the newest lines survive."""
    share = max(200, limit // max(len(parts), 1))
    out = []
    for title, text in parts:
        body = text.strip() or "(empty)"
        if len(body) > share:
            body = "..." + body[-share:]
        out.append(f"--- {title}\n{body}")
    return "\n".join(out)


def safely(title: str, produce: object) -> tuple[str, str]:
    """Run a diagnostics producer; a failure becomes text, never an exception."""
    try:
        text = produce() if callable(produce) else str(produce)
    except Exception as exc:  # diagnostics must never hide the real failure
        text = f"(could not collect: {exc})"
    return title, str(text)
