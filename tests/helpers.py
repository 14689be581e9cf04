"""Helpers for tests that drive real processes: the CLI, ping; and an independent leak listing."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pytest_svctunnel import names


def agent_pids(run_id: str, root: Path) -> list[str]:
    """``svctunnel agent`` processes of one run under the state root ``root``: whatever their
    flags, one of their arguments is a path in the run's state directory (its key file)."""
    run_dir = f"{root / run_id}/"
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:  # not a process, or gone meanwhile
            continue
        if "agent" in argv and any("svctunnel" in a for a in argv) and any(a.startswith(run_dir) for a in argv):
            found.append(entry.name)
    return found


def leftovers(run_id: str, root: Path) -> dict[str, list[str]]:
    """Everything of one run that exists: namespaces, links here, agent processes, state directory.
    Listed from the kernel's own files (independent of the code under test)."""
    netns_dir = Path("/run/netns")
    return {
        "namespaces": sorted(p.name for p in netns_dir.glob(f"{names.netns_prefix(run_id)}*"))
        if netns_dir.is_dir()
        else [],
        "links": sorted(p.name for p in Path("/sys/class/net").glob(f"{names.link_prefix(run_id)}*")),
        "agents": agent_pids(run_id, root),
        "state dir": [str(root / run_id)] if (root / run_id).exists() else [],
    }


def remove_by_hand(run_id: str, root: Path) -> None:
    """Last resort after the assertions, whatever failed: remove a run's objects by its id only
    (independent of the code under test)."""
    left = leftovers(run_id, root)
    for pid in left["agents"]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    for name in left["namespaces"]:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    for name in left["links"]:
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    shutil.rmtree(root / run_id, ignore_errors=True)


def svctunnel_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pytest_svctunnel", *args]


def wait_until(check: Callable[[], object], what: str, seconds: float = 60.0, interval: float = 0.01) -> None:
    """Poll ``check`` until it is true; an AssertionError naming ``what`` after ``seconds``."""
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, f"not within {seconds:g} s: {what}"
        time.sleep(interval)


class Connect:
    """A running ``svctunnel connect`` process (optionally inside a namespace); its log (stderr)
    goes to a file, readable while it runs."""

    def __init__(self, args: list[str], ns: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", ns] if ns else []
        self._log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process, read after it
        self.proc = subprocess.Popen(
            prefix + svctunnel_cmd("connect", *args), stdout=subprocess.PIPE, stderr=self._log, text=True
        )

    def ready_line(self, timeout: float = 30.0) -> str:
        """The ``ready`` line, or an assertion error with what the process said."""
        assert self.proc.stdout is not None
        if select.select([self.proc.stdout], [], [], timeout)[0]:
            line = self.proc.stdout.readline()
            if line.startswith("ready"):
                return line
        self.stop()
        raise AssertionError(f"no ready line; exit {self.proc.returncode}; stderr:\n{self.stderr()}")

    def stderr(self) -> str:
        """Its log so far."""
        return os.pread(self._log.fileno(), 1 << 20, 0).decode(errors="replace")

    def wait_log(self, needle: str, seconds: float = 30.0) -> str:
        """Its log once ``needle`` is in it; an AssertionError with the log if it does not come."""
        wait_until(lambda: needle in self.stderr() or self.proc.poll() is not None, f"{needle!r} in the log", seconds)
        assert needle in self.stderr(), f"exit {self.proc.returncode} before {needle!r}:\n{self.stderr()}"
        return self.stderr()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def ping(
    address: object,
    dev: str | None = None,
    *,
    ns: str | None = None,
    size: int | None = None,
    dont_fragment: bool = False,
    count: int = 1,
) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", ns] if ns else []
    argv += ["ping", "-c", str(count), "-W", "2", "-i", "0.2"]
    if dev:
        argv += ["-I", dev]
    if size is not None:
        argv += ["-s", str(size)]
    if dont_fragment:
        argv += ["-M", "do"]
    return subprocess.run([*argv, str(address)], capture_output=True, text=True)


def connect_argv(
    service: object, key_file: object, dev: str, ipv4: str, remote_ipv4: str, ipv6: str, remote_ipv6: str
) -> list[str]:
    """``svctunnel connect`` arguments for one network with explicit addresses on both ends."""
    return [
        "--service",
        str(service),
        "--key-file",
        str(key_file),
        "--dev",
        dev,
        "--ipv4",
        ipv4,
        "--remote-ipv4",
        remote_ipv4,
        "--ipv6",
        ipv6,
        "--remote-ipv6",
        remote_ipv6,
    ]


# every setting, in the option table's order (the plugin's and the config tests' expectation)
OPTION_KEYS = (
    "backend",
    "peer",
    "port",
    "vni",
    "ipv4",
    "ipv6",
    "timeout",
    "keep",
    "underlay_dev",
    "keepalive",
    "misses",
    "reap",
    "kubeconfig",
    "context",
    "namespace",
    "image",
    "service_type",
    "node",
    "bridge",
    "target",
    "pod_dev",
    "idle_exit",
)
