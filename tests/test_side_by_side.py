"""Sessions and ``svctunnel connect`` runs side by side on one host, on real labs: none takes another's
device or addresses, and traffic not bound to any device reaches the right pod.

"The right pod" is proven by the pod itself: a TCP server in the pod end's network namespace,
bound to the pod end's address, answers with the run id of its lab, and the client connects
without binding to a device (as a library that just connects to an address would)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_svctunnel import keys, names
from pytest_svctunnel.lab import Lab
from pytest_svctunnel.runs import Run, state_root

from .helpers import Connect, leftovers, ping, remove_by_hand, wait_until

pytestmark = pytest.mark.root

ANSWER = """
import socket, sys
address, answer = sys.argv[1], sys.argv[2]
with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as server:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, 0))  # a port of its own: tests in parallel (xdist) may serve one address
    server.listen()
    print("listening", server.getsockname()[1], flush=True)
    server.settimeout(60)
    while True:
        conn, _ = server.accept()
        conn.sendall(answer.encode())
        conn.close()
"""

PROBE = f'''
import socket
import subprocess
import sys

ANSWER = {ANSWER!r}


def answer_from(pod_ns, address, answer):
    """What the pod end's address answers to a connection not bound to any device, and the route."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", pod_ns, sys.executable, "-c", ANSWER, str(address), answer],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        said = server.stdout.readline().split()
        assert said[:1] == ["listening"], said
        route = subprocess.run(["ip", "route", "get", str(address)], capture_output=True, text=True).stdout
        with socket.create_connection((str(address), int(said[1])), timeout=5) as conn:
            return conn.recv(64).decode(), route
    finally:
        server.kill()
        server.wait()


def reaches_its_own_pod(svctunnel, net):
    """Unbound connections to each of the network's pod-end addresses reach the run's own pod, and
    the kernel routes them over the network's device."""
    pod_ns = f"svt-{{svctunnel.run_id}}-pod"
    for remote in (net.remote_ipv4, net.remote_ipv6):
        got, route = answer_from(pod_ns, remote.ip, svctunnel.run_id)
        assert got == svctunnel.run_id, f"{{remote.ip}} answered {{got!r}}, not its own run's pod"
        assert f" dev {{net.dev}} " in route, route
'''

SUITE = (
    PROBE
    + """

import pytest



def test_default(svctunnel):
    reaches_its_own_pod(svctunnel, svctunnel.default)


@pytest.mark.svctunnel_network("media")
def test_media(svctunnel, svctunnel_network):
    reaches_its_own_pod(svctunnel, svctunnel_network)


@pytest.mark.svctunnel_network("signalling")
def test_signalling(svctunnel, svctunnel_network):
    reaches_its_own_pod(svctunnel, svctunnel_network)
"""
)
HEADER = re.compile(r"svctunnel: run (?P<run>[0-9a-f]{6});")


def inner_pytest(path: Path) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
    argv += ["--svctunnel-backend", "lab", "--timeout", "120", "-rA", "test_side.py"]
    return subprocess.Popen(argv, cwd=path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("round_", [1, 2], ids=["round-1", "round-2"])
def test_four_sessions_started_half_a_second_apart_never_cross(pytester: pytest.Pytester, round_: int) -> None:
    pytester.makepyfile(test_side=SUITE)
    sessions = []
    for _ in range(4):
        sessions.append(inner_pytest(pytester.path))
        time.sleep(0.5)
    outputs = [session.communicate(timeout=300)[0] for session in sessions]
    run_ids = [match["run"] for out in outputs if (match := HEADER.search(out))]
    try:
        for session, out in zip(sessions, outputs, strict=True):
            assert session.returncode == 0, out
            assert re.search(r"\b3 passed\b", out), out
        assert len(set(run_ids)) == 4, run_ids
    finally:
        for run_id in run_ids:
            left = leftovers(run_id, state_root())
            remove_by_hand(run_id, state_root())
            assert not any(left.values()), f"run {run_id} left behind: {left}"


# -- svctunnel connect -------------------------------------------------------------------------------------------


@pytest.fixture
def labs() -> Iterator[list[Lab]]:
    """Two labs, each with its agent."""
    built: list[Lab] = []
    try:
        for _ in range(2):
            lab = Lab(Run.new())
            built.append(lab)
            lab.up()
            lab.start_agent(KEY)
        yield built
    finally:
        for lab in built:
            lab.down()
            lab.run.remove()


KEY = bytes(range(32))


def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "connect.key"
    keys.write_key_file(path, KEY)
    return path


def vxlan_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show", "type", "vxlan"], capture_output=True, text=True).stdout
    return {line.split(": ")[1].split("@")[0] for line in out.splitlines()}


def ready_fields(line: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in line.split()[1:])


def test_two_connects_get_their_own_device_and_addresses(
    labs: list[Lab], connect: type[Connect], tmp_path: Path
) -> None:
    before = vxlan_links()
    keyfile = key_file(tmp_path)
    runs = []
    for lab in labs:
        started = connect(["--service", str(lab.plan.service(4)), "--key-file", str(keyfile)])
        runs.append(ready_fields(started.ready_line()))
        time.sleep(0.2)
    first, second = runs
    assert first["dev"] != second["dev"] and {first["dev"], second["dev"]} <= vxlan_links() - before
    assert first["local"].split(",")[0] != second["local"].split(",")[0]
    probe: dict[str, object] = {}
    exec(PROBE, probe)
    for lab, fields in zip(labs, runs, strict=True):
        for remote in fields["remote"].split(","):
            address = remote.split("/")[0]
            got, route = probe["answer_from"](lab.plan.ns("pod"), address, lab.run.id)  # type: ignore[operator]
            assert got == lab.run.id and f" dev {fields['dev']} " in route, (address, got, route)


def test_a_connect_that_would_take_what_another_holds_stops_naming_it(
    labs: list[Lab], connect: type[Connect], tmp_path: Path
) -> None:
    keyfile = key_file(tmp_path)
    holder = connect(["--service", str(labs[0].plan.service(4)), "--key-file", str(keyfile)])
    fields = ready_fields(holder.ready_line())
    service = str(labs[1].plan.service(4))
    owner = re.compile(r"run [0-9a-f]{6} \(svctunnel connect, pid \d+\)")
    for args, remedy in (
        (["--dev", fields["dev"]], "choose another --dev"),
        (["--ipv4", fields["local"].split(",")[0]], "give other --ipv4/--ipv6"),
        (["--ipv6", fields["local"].split(",")[1]], "give other --ipv4/--ipv6"),
    ):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest_svctunnel",
                "connect",
                "--service",
                service,
                "--key-file",
                str(keyfile),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, done.stderr
        assert owner.search(done.stderr) and remedy in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert holder.proc.poll() is None, holder.stderr()
    remote = fields["remote"].split(",")[0].split("/")[0]
    assert ping(remote, fields["dev"]).returncode == 0, "the holder's tunnel carries traffic as before"
    assert holder.stop() == 0 and "Traceback" not in holder.stderr()


def test_a_killed_connect_is_reaped_with_its_device(labs: list[Lab], connect: type[Connect], tmp_path: Path) -> None:
    keyfile = key_file(tmp_path)
    killed = connect(["--service", str(labs[0].plan.service(4)), "--key-file", str(keyfile)])
    dev = ready_fields(killed.ready_line())["dev"]
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(10)
    assert dev in vxlan_links()
    again = connect(["--service", str(labs[1].plan.service(4)), "--key-file", str(keyfile), "--dev", dev])
    assert ready_fields(again.ready_line())["dev"] == dev, "a killed run's device is made anew, not refused"
    assert again.stop() == 0
    killed = connect(["--service", str(labs[0].plan.service(4)), "--key-file", str(keyfile)])
    dev = ready_fields(killed.ready_line())["dev"]
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(10)
    done = subprocess.run(
        [sys.executable, "-m", "pytest_svctunnel", "reap"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and dev in done.stdout, done.stdout + done.stderr
    wait_until(lambda: dev not in vxlan_links(), f"{dev} removed by the reaper", 10)
    assert not [p for p in state_root().iterdir() if names.RUN_ID.fullmatch(p.name) and (p / "claims.json").exists()]
