"""The one parser per kind of value, shared by the plugin, the CLI and the agent (pure logic)."""

from __future__ import annotations

import pytest

from pytest_svctunnel.values import FALSE, TRUE, ifname_problem, parse_bool, parse_ifname

IFNAMES: dict[str, tuple[str, bool]] = {
    "eth0": ("eth0", True),
    "one-char": ("a", True),
    "15-chars": ("x" * 15, True),
    "dashes-underscores": ("svt-ab_1", True),
    "three-dots": ("...", True),
    "dot-inside": ("eth0.100", True),
    "punctuation": ("a!@#$^&*()+=", True),
    "empty": ("", False),
    "16-chars": ("x" * 16, False),
    "slash": ("a/b", False),
    "colon": ("eth0:1", False),
    "percent": ("vx%d", False),  # the kernel would pick a name of its own
    "space": ("a b", False),
    "tab": ("a\tb", False),
    "newline": ("a\nb", False),
    "nul": ("a\0", False),
    "dot": (".", False),
    "dotdot": ("..", False),
    "non-ascii": ("ethé", False),
    "non-ascii-bridge": ("brü", False),
    "non-printable-ascii": ("eth\x7f", False),
}


@pytest.mark.parametrize(("name", "ok"), IFNAMES.values(), ids=IFNAMES.keys())
def test_interface_names(name: str, ok: bool) -> None:
    assert (ifname_problem(name) is None) is ok
    if ok:
        assert parse_ifname(name) == name
    else:
        with pytest.raises(ValueError, match="is not a Linux interface name: "):
            parse_ifname(name)


@pytest.mark.parametrize("text", [*TRUE, *FALSE, "TRUE", " Yes ", "Off"])
def test_booleans(text: str) -> None:
    assert parse_bool(text) is (text.strip().lower() in TRUE)


@pytest.mark.parametrize("text", ["", "2", "y", "enable", "nope"])
def test_what_is_not_a_boolean_is_an_error(text: str) -> None:
    with pytest.raises(ValueError, match="is not true or false"):
        parse_bool(text)
