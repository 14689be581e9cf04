"""The CLI contract: keygen, and bad arguments that exit 2 with one line and touch nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from pytest_svctunnel import device, keys, netns
from pytest_svctunnel.runs import new_run_id

from .helpers import svctunnel_cmd


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(svctunnel_cmd(*args), capture_output=True, text=True, timeout=60)


def test_keygen_prints_a_usable_key(tmp_path: Path) -> None:
    first, second = run_cli("keygen"), run_cli("keygen")
    assert first.returncode == 0
    text = first.stdout.strip()
    assert len(text) == 64 and int(text, 16) >= 0
    assert text != second.stdout.strip()
    path = tmp_path / "key"
    path.write_text(first.stdout)
    assert keys.read_key_file(path) == bytes.fromhex(text)


@pytest.fixture
def good_key(tmp_path: Path) -> Path:
    path = tmp_path / "good.key"
    keys.write_key_file(path, keys.generate_key())
    return path


@pytest.fixture
def short_key(tmp_path: Path) -> Path:
    path = tmp_path / "short.key"
    path.write_text("abcd1234\n")
    return path


RUN = new_run_id()

CONNECT_BAD = [
    pytest.param(["--ipv4", "10.30.30.300/30"], "10.30.30.300/30", id="ipv4-does-not-parse"),
    pytest.param(["--ipv4", "10.30.30.2"], "with prefix", id="ipv4-without-prefix"),
    pytest.param(["--ipv6", "10.30.30.2/30"], "IPv6", id="ipv6-given-ipv4"),
    pytest.param(["--remote-ipv4", "nonsense"], "nonsense", id="remote-ipv4"),
    pytest.param(["--vni", "0"], "VNI", id="vni-zero"),
    pytest.param(["--vni", "16777216"], "VNI", id="vni-too-big"),
    pytest.param(["--service", "198.18.0.1:0"], "198.18.0.1:0", id="service-port-zero"),
    pytest.param(["--service", "198.18.0.1:65536"], "198.18.0.1:65536", id="service-port-too-big"),
    pytest.param(["--service", "not-an-address"], "not-an-address", id="service-not-address"),
    pytest.param(["--dev", "a-very-long-device-name"], "interface name", id="dev-too-long"),
    pytest.param(["--timeout", "-1"], "timeout", id="timeout-negative"),
    pytest.param(["--key-file", "/nonexistent/svctunnel.key"], "svctunnel keygen", id="key-missing"),
    pytest.param(["--key-file", "/"], "cannot be read", id="key-unreadable"),
    pytest.param(["--key-file", "SHORT"], "too short", id="key-too-short"),
    pytest.param(["--ipv4", "10.50.0.1/32"], "no address for the other end", id="ipv4-no-room-for-remote"),
]


@pytest.mark.parametrize(("extra", "needle"), CONNECT_BAD)
def test_connect_bad_arguments(extra: list[str], needle: str, good_key: Path, short_key: Path) -> None:
    args = {"--service": "198.18.0.1:5533", "--key-file": str(good_key), "--dev": "svtclitest0"}
    for flag, value in zip(extra[::2], extra[1::2], strict=False):
        args[flag] = str(short_key) if value == "SHORT" else value
    argv = [item for pair in args.items() for item in pair]
    done = run_cli("connect", *argv)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needle in lines[0]
    assert done.stdout == ""
    assert not device.links_with_prefix(None, f"svt{RUN}-")


AGENT_BAD = [
    pytest.param(["--port", "0"], "port", id="port-zero"),
    pytest.param(["--port", "65536"], "port", id="port-too-big"),
    pytest.param(["--peer", "999.1.1.1"], "999.1.1.1", id="peer-not-address"),
    pytest.param(["--key-file", "/nonexistent/k"], "svctunnel keygen", id="key-missing"),
    pytest.param(["--key-file", "SHORT"], "too short", id="key-too-short"),
    pytest.param([], "--key-file", id="no-key"),
]


@pytest.mark.parametrize(("extra", "needle"), AGENT_BAD)
def test_agent_bad_arguments(extra: list[str], needle: str, short_key: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SVCTUNNEL_KEY_FILE", raising=False)
    argv = [str(short_key) if a == "SHORT" else a for a in extra]
    done = run_cli("agent", *argv)
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert needle in lines[0]


def test_agent_reads_its_settings_from_the_environment(tmp_path: Path) -> None:
    env_key = tmp_path / "env.key"
    env_key.write_text("00\n")
    done = subprocess.run(
        svctunnel_cmd("agent"),
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SVCTUNNEL_KEY_FILE": str(env_key)},
    )
    assert done.returncode == 2
    assert str(env_key) in done.stderr and "too short" in done.stderr


def test_lab_down_of_an_unknown_run_is_a_usage_error() -> None:
    done = run_cli("lab", "down", "--run", "zzzzzz")
    assert done.returncode == 2
    assert "lab status" in done.stderr
    assert not netns.listing("svt-zzzzzz")
