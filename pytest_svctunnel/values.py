"""The one parser for each kind of setting value, shared by the plugin, the CLI and the agent.

Pure: each function takes text and returns the value, or raises ValueError that says what is
wrong with the text; the caller adds where the text came from (a flag, an environment
variable, an ini key) and how to fix it. Three bugs came from rules like these written twice.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
MAX_IFNAME = 15  # IFNAMSIZ - 1
_IFNAME_FORBIDDEN = "/:%"  # '/' and ':' the kernel refuses; '%' makes it pick a name of its own


def _number(text: str, cast: Callable[[str], float], what: str, low: int, high: int, low_open: bool) -> float:
    try:
        value = cast(text)
    except ValueError:
        kind = "a whole number" if cast is int else "a number"
        raise ValueError(f"{what} {text!r} is not {kind}") from None
    inside = low < value <= high if low_open else low <= value <= high  # also False for NaN
    if not inside:
        bounds = f"({low}, {high}]" if low_open else f"{low}..{high}"
        raise ValueError(f"{what} {text!r} is outside {bounds}")
    return value


def parse_port(text: str) -> int:
    """A UDP port, 1..65535."""
    return int(_number(text, int, "port", 1, 65535, False))


def parse_vni(text: str) -> int:
    """A VXLAN network identifier, 1..16777215."""
    return int(_number(text, int, "VNI", 1, 0xFFFFFF, False))


def parse_seconds(text: str) -> float:
    """A deadline or interval in seconds, more than 0 and at most an hour."""
    return _number(text, float, "seconds", 0, 3600, True)


def parse_misses(text: str) -> int:
    """How many keepalives in a row may go unanswered, 1..100."""
    return int(_number(text, int, "misses", 1, 100, False))


TRUE = ("1", "true", "yes", "on")
FALSE = ("0", "false", "no", "off")


def parse_bool(text: str) -> bool:
    """A boolean as environment variables and ini files write it: 1/0, true/false, yes/no, on/off."""
    lowered = text.strip().lower()
    if lowered in TRUE:
        return True
    if lowered in FALSE:
        return False
    raise ValueError(f"{text!r} is not true or false (use one of {', '.join(TRUE + FALSE)})")


def parse_address(text: str) -> IPAddress:
    """An IPv4 or IPv6 address."""
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address") from None


def parse_text(text: str) -> str:
    """Any non-empty text."""
    if not text:
        raise ValueError("empty")
    return text


def ifname_problem(name: str) -> str | None:
    """What makes ``name`` unusable as a Linux interface name, or None if it is a good one.

    The kernel takes 1 to 15 bytes without '/', ':' or white space, and not '.' or '..'; a '%'
    makes it pick a name of its own (``%d``). On top of that only printable ASCII is allowed,
    so that a name means the same bytes on both ends and in every message."""
    if not name:
        return "it is empty"
    if not (name.isascii() and name.isprintable()):
        return "only printable ASCII characters are allowed"
    if len(name) > MAX_IFNAME:
        return f"it has {len(name)} characters, at most {MAX_IFNAME} are allowed"
    if name in (".", ".."):
        return "'.' and '..' are not interface names"
    bad = sorted({c for c in name if c in _IFNAME_FORBIDDEN or c.isspace()})
    if bad:
        return f"it contains {', '.join(repr(c) for c in bad)}"
    return None


def parse_ifname(text: str) -> str:
    """A Linux interface name: 1 to 15 printable ASCII characters, no '/', ':', '%' or space."""
    problem = ifname_problem(text)
    if problem is not None:
        raise ValueError(f"{text!r} is not a Linux interface name: {problem}")
    return text


def choice(choices: tuple[str, ...]) -> Callable[[str], str]:
    """A parser that accepts exactly one of ``choices``."""

    def parse(text: str) -> str:
        if text not in choices:
            raise ValueError(f"choose one of {', '.join(choices)}")
        return text

    return parse
