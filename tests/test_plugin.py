"""The pytest plugin as a user sees it, through pytester.

Settings and the report header, usage errors, marker rules at collection, and real
sessions on the built-in lab: networks from marks, report sections, --svctunnel-keep
and a missing CAP_NET_ADMIN. Real sessions run as their own processes
(``runpytest_subprocess``). Other sessions' labs may exist on this host at the same
time, so leak checks look at what carries the inner run's id (the id from the report
header names every namespace, link, state directory and agent key file of a run).
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator, Sequence

import pytest

from pytest_svctunnel.runs import state_root

from .helpers import OPTION_KEYS, leftovers, remove_by_hand

USAGE_ERROR = pytest.ExitCode.USAGE_ERROR
FLAGS = tuple("--svctunnel-" + key.replace("_", "-") for key in OPTION_KEYS)
ROLES = ("home", "wan", "node", "pod")
INNER_TIMEOUT_S = 180
# hypothesis' plugin re-imports hypothesis in every in-process run (about 0.5 s); the inner runs do not use it
NO_HYPOTHESIS = ("-p", "no:hypothesispytest")

_HEADER = re.compile(r"svctunnel: run (?P<run>[0-9a-f]{6}); (?P<items>.*)")
_ITEM = re.compile(r"(?P<key>\w+)=(?P<value>.*) \((?P<source>cli|env|ini|default)\)")
_RUN_IN_NAME = re.compile(r"svt-?(?P<run>[0-9a-f]{6})-")

PROBE = """
from pathlib import Path


def test_probe():
    Path("ran").touch()
"""


# -- helpers -------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_outer_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The inner runs see only the settings a test gives them (tox passes SVCTUNNEL_* through)."""
    for key in OPTION_KEYS:
        monkeypatch.delenv(f"SVCTUNNEL_{key.upper()}", raising=False)


def header(result: pytest.RunResult) -> tuple[str, dict[str, tuple[str, str]]]:
    """The run id and ``key -> (value, source)`` from the one ``svctunnel:`` report header line."""
    lines = [line for line in result.outlines if line.startswith("svctunnel: run ")]
    assert len(lines) == 1, "expected one svctunnel header line:\n" + "\n".join(result.outlines)
    match = _HEADER.fullmatch(lines[0])
    assert match is not None, lines[0]
    items: dict[str, tuple[str, str]] = {}
    for item in match["items"].split(", "):
        parsed = _ITEM.fullmatch(item)
        assert parsed is not None, f"header item {item!r} is not 'key=value (source)': {lines[0]}"
        items[parsed["key"]] = (parsed["value"], parsed["source"])
    assert tuple(items) == OPTION_KEYS, lines[0]
    return match["run"], items


def inprocess(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest(*NO_HYPOTHESIS, *args)


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def assert_nothing_left(run_id: str) -> None:
    left = leftovers(run_id, state_root())
    assert not any(left.values()), f"run {run_id} left behind: {left}"


def new_namespaces(before: set[str], run_id: str) -> list[str]:
    """svt- namespaces that appeared since ``before``, except those named for another run
    (a concurrent session's lab); unattributable svt- names count."""
    fresh = [n for n in netns_names() - before if n.startswith("svt")]
    return sorted(n for n in fresh if (m := _RUN_IN_NAME.match(n)) is None or m["run"] == run_id)


def block(lines: Sequence[str], title: str) -> list[str]:
    """One report block: from its ``___ title ___`` line up to the next block or ``===`` line."""
    start = [i for i, line in enumerate(lines) if re.fullmatch(rf"_+ {re.escape(title)} _+", line)]
    assert len(start) == 1, f"expected one block {title!r}:\n" + "\n".join(lines)
    end = next(
        (j for j in range(start[0] + 1, len(lines)) if re.fullmatch(r"_{3,} .+ _{3,}|={3,}.*", lines[j])),
        len(lines),
    )
    return list(lines[start[0] : end])


def summary(result: pytest.RunResult, outcome: str, test: str) -> str:
    """The message of one test in the short test summary (``-rA``; ``-vv`` keeps it whole)."""
    pattern = re.compile(rf"{outcome} \S+::{re.escape(test)} - (?P<message>.*)")
    found = [m["message"] for line in result.outlines if (m := pattern.fullmatch(line))]
    assert len(found) == 1, f"expected one {outcome} summary line for {test}:\n" + "\n".join(result.outlines)
    return found[0]


def section_starts(lines: Sequence[str], title: str = "svctunnel diagnostics") -> list[int]:
    return [i for i, line in enumerate(lines) if re.fullmatch(rf"-+ {re.escape(title)} -+", line)]


def section(lines: Sequence[str], title: str = "svctunnel diagnostics") -> str:
    """The body of one report section within ``lines`` (what pytest prints for report.sections)."""
    starts = section_starts(lines, title)
    assert len(starts) == 1, f"expected one {title!r} section:\n" + "\n".join(lines)
    end = next((j for j in range(starts[0] + 1, len(lines)) if re.fullmatch(r"-{3,} .+ -{3,}", lines[j])), len(lines))
    return "\n".join(lines[starts[0] + 1 : end])


def link_line(run_id: str, dev: str) -> str:
    """A link state line with counters, as the diagnostics render it."""
    return rf"(?m)^svt{run_id}-{dev}: \S+ mtu \d+ rx \d+ pkts/\d+ B tx \d+ pkts/\d+ B rx_err \d+ tx_err \d+"


def svctunnel_cli(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.run(sys.executable, "-m", "pytest_svctunnel", *args, timeout=INNER_TIMEOUT_S)


class InnerRuns:
    """Runs an inner pytest in its own process on the lab and remembers its run id for cleanup."""

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.run_ids: list[str] = []

    def run(self, *args: str) -> tuple[pytest.RunResult, str]:
        result = self.pytester.runpytest_subprocess(
            *NO_HYPOTHESIS,
            "-p",
            "no:cacheprovider",
            "--timeout",
            "120",
            "--svctunnel-backend",
            "lab",
            "-rA",
            "-vv",
            *args,
            timeout=INNER_TIMEOUT_S,
        )
        run_id, _ = header(result)
        self.run_ids.append(run_id)
        return result, run_id

    def clean(self) -> None:
        """Last resort after the assertions: remove whatever an inner run left (by its id only)."""
        for run_id in self.run_ids:
            if not any(leftovers(run_id, state_root()).values()):
                continue
            if (state_root() / run_id / "lab.json").exists():
                subprocess.run(
                    [sys.executable, "-m", "pytest_svctunnel", "lab", "down", "--run", run_id],
                    capture_output=True,
                    timeout=INNER_TIMEOUT_S,
                )
            remove_by_hand(run_id, state_root())


@pytest.fixture
def inner(pytester: pytest.Pytester) -> Iterator[InnerRuns]:
    runs = InnerRuns(pytester)
    yield runs
    runs.clean()


# -- 1. settings and the report header ------------------------------------------


def test_header_shows_cli_value(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PROBE)
    result = inprocess(pytester, "--svctunnel-port", "6000", "--svctunnel-keep", "on-failure")
    assert result.ret == pytest.ExitCode.OK
    line = next(line for line in result.outlines if line.startswith("svctunnel:"))
    assert "port=6000 (cli)" in line
    _, items = header(result)
    assert items["port"] == ("6000", "cli")
    assert items["keep"] == ("on-failure", "cli")
    assert items["vni"] == ("333", "default")


def test_header_shows_env_value(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makepyfile(PROBE)
    monkeypatch.setenv("SVCTUNNEL_PORT", "6000")
    monkeypatch.setenv("SVCTUNNEL_PEER", "192.0.2.9")
    result = inprocess(pytester)
    assert result.ret == pytest.ExitCode.OK
    _, items = header(result)
    assert items["port"] == ("6000", "env")
    assert items["peer"] == ("192.0.2.9", "env")
    assert items["timeout"][1] == "default"


@pytest.mark.parametrize(
    "config_file",
    [
        ("ini", "[pytest]\nsvctunnel_port = 6000\nsvctunnel_underlay_dev = eth7\n"),
        ("toml", '[tool.pytest.ini_options]\nsvctunnel_port = "6000"\nsvctunnel_underlay_dev = "eth7"\n'),
        ("toml", '[tool.pytest]\nsvctunnel_port = "6000"\nsvctunnel_underlay_dev = "eth7"\n'),
    ],
    ids=["pytest.ini", "pyproject-ini_options", "pyproject-native"],
)
def test_header_shows_ini_value(pytester: pytest.Pytester, config_file: tuple[str, str]) -> None:
    kind, text = config_file
    if kind == "ini":
        pytester.makeini(text)
    else:
        pytester.makepyprojecttoml(text)
    pytester.makepyfile(PROBE)
    result = inprocess(pytester)
    assert result.ret == pytest.ExitCode.OK
    _, items = header(result)
    assert items["port"] == ("6000", "ini")
    assert items["underlay_dev"] == ("eth7", "ini")


def test_header_shows_defaults(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(PROBE)
    result = inprocess(pytester)
    assert result.ret == pytest.ExitCode.OK
    _, items = header(result)
    assert {key: source for key, (_, source) in items.items()} == dict.fromkeys(OPTION_KEYS, "default")
    assert items["backend"][0] == "kubernetes"
    assert items["port"][0] == "5533"
    assert items["vni"][0] == "333"
    assert items["keep"][0] == "never"
    assert float(items["timeout"][0]) == 60


def test_precedence_cli_over_env_over_ini(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    pytester.makeini(
        "[pytest]\nsvctunnel_port = 6002\nsvctunnel_vni = 702\nsvctunnel_timeout = 12\nsvctunnel_keep = always\n"
    )
    monkeypatch.setenv("SVCTUNNEL_PORT", "6001")
    monkeypatch.setenv("SVCTUNNEL_VNI", "701")
    monkeypatch.setenv("SVCTUNNEL_PEER", "192.0.2.1")
    pytester.makepyfile(PROBE)
    result = inprocess(
        pytester, "--svctunnel-port", "6000", "--svctunnel-timeout", "11", "--svctunnel-peer", "192.0.2.2"
    )
    assert result.ret == pytest.ExitCode.OK
    _, items = header(result)
    assert items["port"] == ("6000", "cli")  # cli, env and ini all set
    assert items["peer"] == ("192.0.2.2", "cli")  # cli and env set
    assert items["vni"] == ("701", "env")  # env and ini set
    assert float(items["timeout"][0]) == 11 and items["timeout"][1] == "cli"  # cli and ini set
    assert items["keep"] == ("always", "ini")  # only ini set
    assert items["backend"] == ("kubernetes", "default")


# -- 2. invalid settings ----------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        (["--svctunnel-port", "0"], {}, ["--svctunnel-port", "'0'"]),
        (["--svctunnel-keep", "sometimes"], {}, ["--svctunnel-keep", "'sometimes'"]),
        (["--svctunnel-vni", "99999999"], {}, ["--svctunnel-vni", "'99999999'"]),
        ([], {"SVCTUNNEL_TIMEOUT": "abc"}, ["SVCTUNNEL_TIMEOUT", "'abc'"]),
        ([], {"SVCTUNNEL_PEER": "not-an-address"}, ["SVCTUNNEL_PEER", "'not-an-address'"]),
        (["--svctunnel-backend", "docker"], {}, ["--svctunnel-backend", "kubernetes, lab"]),
        (["--svctunnel-bridge", "br0"], {}, ["--svctunnel-bridge", "--svctunnel-node NAME"]),
        ([], {"SVCTUNNEL_SERVICE_TYPE": "ClusterIP"}, ["SVCTUNNEL_SERVICE_TYPE", "LoadBalancer, NodePort"]),
        (["--svctunnel-node", "n1", "--svctunnel-bridge", ".."], {}, ["--svctunnel-bridge", "'..'"]),
        (["--svctunnel-node", "n1"], {"SVCTUNNEL_BRIDGE": "brü"}, ["SVCTUNNEL_BRIDGE", "printable ASCII"]),
        (["--svctunnel-underlay-dev", "eth%d"], {}, ["--svctunnel-underlay-dev", "'%'"]),
        ([], {"SVCTUNNEL_REAP": "maybe"}, ["SVCTUNNEL_REAP", "true or false"]),
    ],
    ids=[
        "port-0",
        "keep-sometimes",
        "vni-too-big",
        "env-timeout-abc",
        "env-peer",
        "backend-docker",
        "bridge-without-node",
        "env-service-type",
        "bridge-dot-dot",
        "env-bridge-not-ascii",
        "underlay-dev-percent",
        "env-reap-maybe",
    ],
)
def test_invalid_setting_is_usage_error(
    pytester: pytest.Pytester,
    monkeypatch: pytest.MonkeyPatch,
    args: list[str],
    env: dict[str, str],
    names: list[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pytester.makepyfile(PROBE)
    result = inprocess(pytester, *args)
    assert result.ret == USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR: svctunnel:")]
    assert len(errors) == 1, result.errlines
    for name in names:
        assert name in errors[0]
    assert not (pytester.path / "ran").exists()


def test_invalid_ini_value_names_the_ini_key(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\nsvctunnel_port = 70000\n")
    pytester.makepyfile(PROBE)
    result = inprocess(pytester)
    assert result.ret == USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: svctunnel:*svctunnel_port*70000*"])
    assert not (pytester.path / "ran").exists()


@pytest.mark.parametrize(
    ("env", "args"),
    [
        ({"SVCTUNNEL_TIMEOUT": "abc"}, []),
        ({"SVCTUNNEL_BACKEND": "docker"}, []),
        ({}, ["--svctunnel-keep", "sometimes"]),
    ],
    ids=["env-timeout-abc", "env-backend-docker", "cli-keep-sometimes"],
)
def test_help_and_markers_work_with_invalid_settings(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], args: list[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    helped = inprocess(pytester, *args, "--help")
    assert helped.ret == pytest.ExitCode.OK, helped.errlines
    for flag in FLAGS:
        assert any(line.lstrip().startswith(flag) for line in helped.outlines), f"{flag} not in --help"
    marked = inprocess(pytester, *args, "--markers")
    assert marked.ret == pytest.ExitCode.OK, marked.errlines
    marked.stdout.fnmatch_lines(
        ["@pytest.mark.svctunnel_network(name, *, ipv4=None, ipv6=None, vni=None, target=None, pod_dev=None):*"]
    )


# -- 3. marker rules at collection --------------------------------------------------

MARKER_ERRORS = {
    "same-name-different-settings": (
        """
        import pytest

        @pytest.mark.svctunnel_network("media", ipv4="10.40.0.0/29")
        def test_one(svctunnel_network):
            pass

        @pytest.mark.svctunnel_network("media", ipv4="10.41.0.0/29")
        def test_two(svctunnel_network):
            pass
        """,
        [],
        ["'media'", "::test_one", "::test_two"],
    ),
    "overlapping-addresses": (
        """
        import pytest

        @pytest.mark.svctunnel_network("a", ipv4="10.40.0.0/29")
        def test_one(svctunnel_network):
            pass

        @pytest.mark.svctunnel_network("b", ipv4="10.40.0.4/30")
        def test_two(svctunnel_network):
            pass
        """,
        [],
        ["'a'", "'b'", "10.40.0.0/29", "10.40.0.4/30", "overlap"],
    ),
    "overlaps-default-network": (
        """
        import pytest

        @pytest.mark.svctunnel_network("a", ipv6="fd00:3030::/64")
        def test_one(svctunnel_network):
            pass
        """,
        [],
        ["'default' gets no free fd00:3030::/112 block", "'a' (fd00:3030::/64)", "overlap", "--svctunnel-ipv6"],
    ),
    "duplicate-vni": (
        """
        import pytest

        @pytest.mark.svctunnel_network("a", vni=4000)
        def test_one(svctunnel_network):
            pass

        @pytest.mark.svctunnel_network("b", vni=4000)
        def test_two(svctunnel_network):
            pass
        """,
        [],
        ["'a'", "'b'", "4000"],
    ),
    "vni-of-default-network": (
        """
        import pytest

        @pytest.mark.svctunnel_network("a", vni=333)
        def test_one(svctunnel_network):
            pass
        """,
        [],
        ["'default'", "'a'", "333"],
    ),
    "vni-of-configured-default-network": (
        """
        import pytest

        @pytest.mark.svctunnel_network("a", vni=4000)
        def test_one(svctunnel_network):
            pass
        """,
        ["--svctunnel-vni", "4000"],
        ["'default'", "'a'", "4000"],
    ),
    "name-default": (
        """
        import pytest

        @pytest.mark.svctunnel_network("default")
        def test_one(svctunnel_network):
            pass
        """,
        [],
        ["'default'", "::test_one"],
    ),
    "unknown-keyword": (
        """
        import pytest

        @pytest.mark.svctunnel_network("a", ipv5="10.40.0.0/30")
        def test_one(svctunnel_network):
            pass
        """,
        [],
        ["ipv5", "::test_one"],
    ),
    "target-on-the-lab": (
        """
        import pytest

        @pytest.mark.svctunnel_network("media", target="cnf/app=upf", pod_dev="net1")
        def test_one(svctunnel_network):
            pass
        """,
        [],
        ["'media'", "target cnf/app=upf", "needs the kubernetes backend", "--svctunnel-backend lab"],
    ),
    "target-not-a-target": (
        """
        import pytest

        @pytest.mark.svctunnel_network("media", target="upf")
        def test_one(svctunnel_network):
            pass
        """,
        [],
        ["::test_one", "target='upf'", "NAMESPACE/SELECTOR or NAMESPACE/NAME"],
    ),
    "one-pod-device-for-two-networks": (
        """
        import pytest

        @pytest.mark.svctunnel_network("a", target="cnf/app=upf", pod_dev="net1")
        def test_one(svctunnel_network):
            pass

        @pytest.mark.svctunnel_network("b", target="cnf/app=upf", pod_dev="net1")
        def test_two(svctunnel_network):
            pass
        """,
        [],
        ["'a'", "'b'", "device net1", "target cnf/app=upf", "pod_dev="],
    ),
    "ipv4-host-bits-set": (
        """
        import pytest

        @pytest.mark.svctunnel_network("a", ipv4="10.40.0.1/30")
        def test_one(svctunnel_network):
            pass
        """,
        [],
        ["10.40.0.1/30", "::test_one"],
    ),
}


@pytest.mark.parametrize("case", list(MARKER_ERRORS))
def test_marker_error_is_usage_error_before_anything_runs(pytester: pytest.Pytester, case: str) -> None:
    source, args, fragments = MARKER_ERRORS[case]
    pytester.makepyfile(test_aaa_probe=PROBE, test_marks=source)
    before = netns_names()
    # a short timeout bounds the run should a broken rule let the tests build a lab
    result = inprocess(pytester, "--svctunnel-backend", "lab", "--svctunnel-timeout", "10", *args)
    run_id, _ = header(result)
    assert result.ret == USAGE_ERROR
    errors = [line for line in result.errlines if line.startswith("ERROR: svctunnel:")]
    assert len(errors) == 1, result.errlines
    for fragment in fragments:
        assert fragment in errors[0]
    assert not (pytester.path / "ran").exists(), "a test ran although collection failed"
    assert new_namespaces(before, run_id) == []
    assert_nothing_left(run_id)


def test_same_name_with_same_settings_is_fine(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_aaa_probe=PROBE,
        test_marks="""
        import pytest

        @pytest.mark.svctunnel_network("media", ipv4="10.40.0.0/29", vni=4000)
        def test_one(svctunnel_network):
            pass

        @pytest.mark.svctunnel_network(name="media", vni=4000, ipv4="10.40.0.0/29")
        def test_two(svctunnel_network):
            pass
        """,
    )
    before = netns_names()
    result = inprocess(pytester, "--svctunnel-backend", "lab", "--collect-only")
    run_id, _ = header(result)
    assert result.ret == pytest.ExitCode.OK, result.errlines
    result.stdout.fnmatch_lines(["*3 tests collected*"])
    assert not any(line.startswith("ERROR") for line in result.errlines)
    assert not (pytester.path / "ran").exists()
    assert new_namespaces(before, run_id) == []
    assert_nothing_left(run_id)


# -- 4. svctunnel_network without a mark ----------------------------------------------


@pytest.mark.root
def test_network_fixture_without_mark_errors(inner: InnerRuns, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        import subprocess

        def test_unmarked(svctunnel_network):
            pass

        def test_tunnel_itself_works(svctunnel):
            done = subprocess.run(["ping", "-c1", "-W2", "-I", svctunnel.dev, str(svctunnel.remote_ipv4.ip)])
            assert done.returncode == 0
        """
    )
    result, run_id = inner.run()
    result.assert_outcomes(passed=1, errors=1)
    assert "@pytest.mark.svctunnel_network" in summary(result, "ERROR", "test_unmarked")
    assert_nothing_left(run_id)


# -- 5. a real multi-network session ------------------------------------------------------

E2E_SUITE = """
import ipaddress
import subprocess
from pathlib import Path

import pytest

ADDRESS = (ipaddress.IPv4Address, ipaddress.IPv6Address)


def ping(address, dev):
    done = subprocess.run(["ping", "-c1", "-W2", "-I", dev, str(address)], capture_output=True, text=True)
    assert done.returncode == 0, f"ping {address} over {dev}: {done.stdout}{done.stderr}"


def check_network(net, run_id):
    assert isinstance(net.local_ipv4, ipaddress.IPv4Interface)
    assert isinstance(net.remote_ipv4, ipaddress.IPv4Interface)
    assert isinstance(net.local_ipv6, ipaddress.IPv6Interface)
    assert isinstance(net.remote_ipv6, ipaddress.IPv6Interface)
    for local, remote in ((net.local_ipv4, net.remote_ipv4), (net.local_ipv6, net.remote_ipv6)):
        assert local.network == remote.network and local.ip != remote.ip
    assert net.dev.startswith(f"svt{run_id}-")
    assert net.mtu > 0
    ping(net.remote_ipv4.ip, net.dev)
    ping(net.remote_ipv6.ip, net.dev)


def test_default_network(svctunnel):
    Path("inner_run_id").write_text(svctunnel.run_id)
    default = svctunnel.networks["default"]
    assert svctunnel.dev == default.dev and svctunnel.vni == default.vni == 333
    assert svctunnel.local_ipv4 == default.local_ipv4 and svctunnel.remote_ipv4 == default.remote_ipv4
    assert svctunnel.local_ipv6 == default.local_ipv6 and svctunnel.remote_ipv6 == default.remote_ipv6
    check_network(default, svctunnel.run_id)  # pings over IPv4 and IPv6


def test_peer_and_service(svctunnel):
    assert isinstance(svctunnel.service_address, ADDRESS)
    assert svctunnel.service.port == 6100
    assert isinstance(svctunnel.peer.address, ADDRESS)
    assert isinstance(svctunnel.peer.port, int) and 1 <= svctunnel.peer.port <= 65535
    assert svctunnel.peer.address.version == svctunnel.service_address.version


@pytest.mark.svctunnel_network("signalling")
def test_signalling_network(svctunnel, svctunnel_network):
    assert svctunnel_network.name == "signalling"
    check_network(svctunnel_network, svctunnel.run_id)


@pytest.mark.svctunnel_network("signalling")
def test_signalling_again(svctunnel_network, svctunnel_networks):
    assert svctunnel_network == svctunnel_networks["signalling"]


@pytest.mark.svctunnel_network("media", ipv4="10.40.0.0/29", vni=4000)
def test_media_network(svctunnel, svctunnel_network):
    assert svctunnel_network.name == "media"
    assert svctunnel_network.vni == 4000
    assert svctunnel_network.remote_ipv4 == ipaddress.IPv4Interface("10.40.0.1/29")
    assert svctunnel_network.local_ipv4 == ipaddress.IPv4Interface("10.40.0.2/29")
    check_network(svctunnel_network, svctunnel.run_id)


def test_networks_are_separate(svctunnel, svctunnel_networks):
    assert set(svctunnel_networks) == {"default", "signalling", "media"}
    assert dict(svctunnel.networks) == dict(svctunnel_networks)
    nets = list(svctunnel_networks.values())
    assert len({n.vni for n in nets}) == 3
    assert len({n.dev for n in nets}) == 3
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            assert not a.local_ipv4.network.overlaps(b.local_ipv4.network), (a, b)
            assert not a.local_ipv6.network.overlaps(b.local_ipv6.network), (a, b)
    # this host has exactly one VXLAN device of this run per network
    out = subprocess.run(["ip", "-o", "link", "show", "type", "vxlan"], capture_output=True, text=True).stdout
    devices = [line.split(": ")[1].split("@")[0] for line in out.splitlines()]
    assert sorted(d for d in devices if d.startswith(f"svt{svctunnel.run_id}-")) == sorted(n.dev for n in nets)
"""


@pytest.mark.root
def test_multi_network_session_end_to_end(
    inner: InnerRuns, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(E2E_SUITE)
    monkeypatch.setenv("SVCTUNNEL_PORT", "6100")
    result, run_id = inner.run()
    assert result.ret == pytest.ExitCode.OK, "\n".join(result.outlines)
    result.assert_outcomes(passed=6)
    _, items = header(result)
    assert items["backend"] == ("lab", "cli")
    assert items["port"] == ("6100", "env")
    assert (pytester.path / "inner_run_id").read_text() == run_id
    assert not section_starts(result.outlines), "diagnostics on passing tests"
    assert not any("lab kept" in line for line in result.outlines)
    assert_nothing_left(run_id)


MANY_SUITE = """
import subprocess

import pytest

COUNT = 255  # with the default network: 256


def ping(address, dev):
    done = subprocess.run(["ping", "-c1", "-W2", "-I", dev, str(address)], capture_output=True, text=True)
    assert done.returncode == 0, f"ping {address} over {dev}: {done.stdout}{done.stderr}"


@pytest.mark.parametrize(
    "number", [pytest.param(i, marks=pytest.mark.svctunnel_network(f"vlan{i}")) for i in range(1, COUNT + 1)]
)
def test_vlan(svctunnel, svctunnel_network, number):
    assert svctunnel_network.name == f"vlan{number}"
    ping(svctunnel_network.remote_ipv4.ip, svctunnel_network.dev)
    ping(svctunnel_network.remote_ipv6.ip, svctunnel_network.dev)


def test_all_of_them(svctunnel):
    nets = list(svctunnel.networks.values())
    assert len(nets) == COUNT + 1
    assert len({n.vni for n in nets}) == len({n.dev for n in nets}) == len({n.local_ipv4.network for n in nets}) == 256
    assert len({n.local_ipv6.network for n in nets}) == 256
    ping(svctunnel.remote_ipv4.ip, svctunnel.dev)
    ping(svctunnel.remote_ipv6.ip, svctunnel.dev)
"""


@pytest.mark.root
def test_256_networks_from_plain_marks_ping_on_both_families(inner: InnerRuns, pytester: pytest.Pytester) -> None:
    """One session, 256 networks (255 marks), over one Service port: each pings its pod end over IPv4
    and IPv6 through its own device."""
    pytester.makepyfile(MANY_SUITE)
    result, run_id = inner.run("-q")
    assert result.ret == pytest.ExitCode.OK, "\n".join(result.outlines[-40:])
    result.assert_outcomes(passed=256)
    ready = [line for line in result.outlines if line.startswith("svctunnel: tunnel ready in")]
    assert len(ready) == 1, "\n".join(result.outlines[-40:])
    assert_nothing_left(run_id)


# -- 6. report sections ---------------------------------------------------------------------


@pytest.mark.root
def test_failing_test_gets_diagnostics_section(inner: InnerRuns, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_passes(svctunnel):
            pass

        def test_fails(svctunnel):
            assert False

        def test_fails_without_tunnel():
            assert False
        """
    )
    result, run_id = inner.run()
    result.assert_outcomes(passed=1, failed=2)
    failure = block(result.outlines, "test_fails")
    body = section(failure)
    assert "listening on UDP port" in body
    assert re.search(link_line(run_id, "0"), body), body
    assert "--- external end links" in body and "--- pod end links" in body
    assert re.search(r"--- external end status\nstate=up local=\S+ peer=\S+ counters: .*handshakes=1", body), body
    assert re.search(r"status: state=up peer=\S+ mtu=1450 networks=", body), body
    pod_links = body.split("--- pod end links", 1)[1]
    assert re.search(link_line(run_id, "0"), pod_links), body
    # only the failing test that uses the tunnel gets the section
    assert len(section_starts(result.outlines)) == 1
    assert section_starts(block(result.outlines, "test_fails_without_tunnel")) == []
    assert_nothing_left(run_id)


@pytest.mark.root
def test_setup_failure_gets_diagnostics_section_and_cleans_up(inner: InnerRuns, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        def test_needs_tunnel(svctunnel):
            pass
        """
    )
    result, run_id = inner.run("--svctunnel-peer", "192.0.2.77", "--svctunnel-timeout", "5")
    result.assert_outcomes(errors=1)
    assert re.search(r"svctunnel: handshake\b", summary(result, "ERROR", "test_needs_tunnel"))
    body = section(block(result.outlines, "ERROR at setup of test_needs_tunnel"))
    assert "listening on UDP port" in body
    assert "192.0.2.77" in body
    assert re.search(link_line(run_id, "lan"), body), body
    assert_nothing_left(run_id)


# -- 7. --svctunnel-keep ------------------------------------------------------------------------

FAILING = """
def test_uses_tunnel(svctunnel):
    assert False
"""
PASSING = """
def test_uses_tunnel(svctunnel):
    pass
"""


@pytest.mark.root
@pytest.mark.parametrize(
    ("keep", "suite"), [("on-failure", FAILING), ("always", PASSING)], ids=["on-failure-failed", "always-passed"]
)
def test_keep_leaves_lab_until_lab_down(inner: InnerRuns, pytester: pytest.Pytester, keep: str, suite: str) -> None:
    pytester.makepyfile(suite)
    result, run_id = inner.run("--svctunnel-keep", keep)
    notes = [line for line in result.outlines if "svctunnel lab down --run" in line]
    assert len(notes) == 1, "\n".join(result.outlines)
    match = re.search(r"svctunnel lab down --run ([0-9a-f]+)", notes[0])
    assert match is not None, notes[0]
    kept_id = match[1]
    assert kept_id == run_id
    kept = leftovers(kept_id, state_root())
    assert kept["namespaces"] == sorted(f"svt-{kept_id}-{role}" for role in ROLES)
    assert {f"svt{kept_id}-lan", f"svt{kept_id}-0"} <= set(kept["links"])
    assert kept["agents"], "the kept lab's agent is not running"

    status = svctunnel_cli(pytester, "lab", "status", "--run", kept_id)
    assert status.ret == 0, status.errlines
    assert kept_id in status.stdout.str() and "(missing)" not in status.stdout.str()

    down = svctunnel_cli(pytester, "lab", "down", "--run", kept_id)
    assert down.ret == 0, down.errlines
    down.stdout.fnmatch_lines([f"removed lab {kept_id}"])
    assert_nothing_left(kept_id)


@pytest.mark.root
@pytest.mark.parametrize(
    ("keep", "suite"), [("never", FAILING), ("on-failure", PASSING)], ids=["never-failed", "on-failure-passed"]
)
def test_keep_removes_lab(inner: InnerRuns, pytester: pytest.Pytester, keep: str, suite: str) -> None:
    pytester.makepyfile(suite)
    result, run_id = inner.run("--svctunnel-keep", keep)
    assert header(result)[1]["keep"] == (keep, "cli")
    assert not any("lab kept" in line or "lab down" in line for line in result.outlines), "\n".join(result.outlines)
    assert_nothing_left(run_id)


# -- 8. without CAP_NET_ADMIN ----------------------------------------------------------------------

NO_NET_ADMIN = ("setpriv", "--bounding-set=-net_admin,-net_raw", "--")


@pytest.mark.root
def test_missing_net_admin_fails_fixture_with_remedy(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        """
        from pathlib import Path

        def test_capability_is_gone():
            status = Path("/proc/self/status").read_text().splitlines()
            effective = int(next(line for line in status if line.startswith("CapEff:")).split()[1], 16)
            assert not effective & (1 << 12)

        def test_needs_tunnel(svctunnel):
            pass
        """
    )
    pytest_without_net_admin = (*NO_NET_ADMIN, sys.executable, "-m", "pytest", *NO_HYPOTHESIS, "-p", "no:cacheprovider")
    result = pytester.run(
        *pytest_without_net_admin, "--svctunnel-backend", "lab", "-rA", "-vv", timeout=INNER_TIMEOUT_S
    )
    run_id, _ = header(result)
    result.assert_outcomes(passed=1, errors=1)
    message = summary(result, "ERROR", "test_needs_tunnel")
    assert "CAP_NET_ADMIN" in message
    assert "as root" in message or "setcap" in message, message
    assert_nothing_left(run_id)

    helped = pytester.run(*pytest_without_net_admin, "--help", timeout=INNER_TIMEOUT_S)
    assert helped.ret == pytest.ExitCode.OK, helped.errlines
    for flag in FLAGS:
        assert any(line.lstrip().startswith(flag) for line in helped.outlines), f"{flag} not in --help"
