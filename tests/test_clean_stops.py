"""Clean stops (issue 3), with real processes and real signals.

SIGINT, SIGTERM or a pytest-timeout at any point of an inner session's setup or teardown
leave no namespace, link, agent or state directory of its run. A SIGKILLed session leaves
them; ``svctunnel reap`` (and ``--svctunnel-reap`` at the next session start) removes exactly
those, by run id, and leaves live, detached and other state roots' runs alone.

Inner sessions are ``python -m pytest`` processes in their own process group, like a
terminal's foreground job: SIGINT goes to the whole group (as Ctrl-C does, reaching the
short-lived helpers pyroute2 forks too), SIGTERM to pytest's pid (as ``kill`` does). The
phase a signal hits is chosen by watching what the setup builds, in order, and what the
teardown removes; the run id comes from the report header.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pytest_svctunnel import names, reaper
from pytest_svctunnel.lab import Lab
from pytest_svctunnel.labagent import LabAgent
from pytest_svctunnel.names import new_run_id
from pytest_svctunnel.pids import ProcessRef, proc_stat
from pytest_svctunnel.runs import OWNER_FILE, OWNERLESS_GRACE_S, STATE_ENV, Run, state_root

from .helpers import leftovers, remove_by_hand

INTERRUPTED = pytest.ExitCode.INTERRUPTED
_HEADER = re.compile(r"^svctunnel: run (?P<run>[0-9a-f]{6});", re.MULTILINE)
_LAB_UP = re.compile(r"^run (?P<run>[0-9a-f]{6}):", re.MULTILINE)
# a final summary line, like "=== 1 passed in 1.33s ===": exactly one, or a second pytest ran
_SUMMARY = re.compile(r"^=+ .* in [0-9.]+s(?: \([^)]*\))? =+$", re.MULTILINE)
WAIT_S = 60.0  # bound of every wait for an inner process; setup takes about a second
# CPython drops an exception raised while fork hooks run, so a signal that arrives during one of
# pyroute2's forks is lost (see interrupts.py); a setup test sends it again if nothing happened
RESEND_AFTER_S = 3.0

INNER_SUITE = """
import os
import signal
import subprocess
import time
from pathlib import Path

from pytest_svctunnel import names


def test_uses_tunnel(svctunnel):
    Path("phase-call.tmp").write_text(svctunnel.run_id)
    os.replace("phase-call.tmp", "phase-call")  # at once: a watcher never reads it half-written
    if "INNER_STUBBORN" in os.environ:  # a process in the lab that ignores SIGTERM: teardown waits for it
        pod = names.netns_name(svctunnel.run_id, "pod")
        stubborn = subprocess.Popen(["ip", "netns", "exec", pod, "sh", "-c", "trap '' TERM; exec sleep 60"])
        Path("stubborn-pid").write_text(str(stubborn.pid))
    if "INNER_ALARM_IN" in os.environ:  # pytest-timeout's alarm, re-armed to go off this long from now
        signal.setitimer(signal.ITIMER_REAL, float(os.environ["INNER_ALARM_IN"]))
    time.sleep(float(os.environ.get("INNER_SLEEP", "0")))
    Path("phase-done").touch()  # the test's last action
"""

QUICK_SUITE = """
def test_without_tunnel():
    pass
"""


# -- inner sessions and what they leave ----------------------------------------------------------


def _clean_env(root: Path, **extra: str) -> dict[str, str]:
    """The inner process's environment: no SVCTUNNEL_* settings from outside, this state root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVCTUNNEL_")}
    env[STATE_ENV] = str(root)
    env.update(extra)
    return env


def _link_exists(name: str) -> bool:
    return Path("/sys/class/net", name).exists()


def _netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def assert_nothing_left(run_id: str, root: Path, context: str = "") -> None:
    left = leftovers(run_id, root)
    assert not any(left.values()), f"run {run_id} left behind: {left}\n{context}"


def wait_until(check: Callable[[], object], what: str, seconds: float = WAIT_S, interval: float = 0.001) -> None:
    end = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < end, f"not within {seconds:g} s: {what}"
        time.sleep(interval)


class Inner:
    """One inner pytest session as a real process in its own process group; output to a file."""

    def __init__(self, directory: Path, root: Path, args: list[str], env: dict[str, str], name: str) -> None:
        self.directory = directory
        self.root = root
        self.out_path = directory / f"{name}.out"
        argv = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
        argv += ["--svctunnel-backend", "lab", "-rA", *args]
        with self.out_path.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=directory,
                env=_clean_env(root, **env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._run_id: str | None = None

    def output(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def run_id(self) -> str:
        """The inner run id, from its report header (printed before any test starts)."""
        if self._run_id is None:
            wait_until(lambda: _HEADER.search(self.output()) or self.proc.poll() is not None, "the report header")
            match = _HEADER.search(self.output())
            assert match is not None, f"no svctunnel header:\n{self.output()}"
            self._run_id = match["run"]
        return self._run_id

    def send(self, signum: int, group: bool) -> None:
        if self.proc.poll() is None:
            (os.killpg if group else os.kill)(self.proc.pid, signum)

    def finish(self, seconds: float = WAIT_S) -> int:
        try:
            return self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"inner pytest still ran after {seconds:g} s:\n{self.output()}") from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(WAIT_S)


class Inners:
    """Starts inner sessions in the pytester directory; the fixture kills and cleans up after."""

    def __init__(self, pytester: pytest.Pytester) -> None:
        self.pytester = pytester
        self.started: list[Inner] = []
        self.roots: list[Path] = []

    def root(self, name: str) -> Path:
        """A private state root (another user's or session's, for the reaper)."""
        path = self.pytester.path / name
        self.roots.append(path)
        return path

    def start(self, *args: str, root: Path | None = None, **env: str) -> Inner:
        inner = Inner(self.pytester.path, root or state_root(), list(args), env, f"inner{len(self.started)}")
        self.started.append(inner)
        return inner

    def clean(self) -> None:
        for inner in self.started:
            inner.kill()
            if inner._run_id is not None:
                remove_by_hand(inner._run_id, inner.root)
        for root in self.roots:
            for run_dir in root.glob("??????"):
                remove_by_hand(run_dir.name, root)


@pytest.fixture
def inners(pytester: pytest.Pytester) -> Iterator[Inners]:
    pytester.makepyfile(test_inner=INNER_SUITE)
    runs = Inners(pytester)
    yield runs
    runs.clean()


def svctunnel_cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest_svctunnel", *args],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        env=_clean_env(root),
    )


def interrupted_once(inner: Inner, output: str) -> None:
    """The inner session stopped as on Ctrl-C, with one pytest and one summary (a forked copy of
    pytest that ran its own teardown would print a second one)."""
    assert inner.proc.returncode == INTERRUPTED, f"exit {inner.proc.returncode}:\n{output}"
    assert "KeyboardInterrupt" in output, output
    assert len(_SUMMARY.findall(output)) == 1, output


# -- 1. a signal during setup -----------------------------------------------------------------------

# what the setup builds, in order: the phase a signal hits is the step after the thing appears
SETUP_PHASES: dict[str, Callable[[Inner], bool]] = {
    "state-directory": lambda i: (i.root / i.run_id).is_dir(),
    "first-namespace": lambda i: _netns_exists(names.netns_name(i.run_id, "home")),
    "lab-wiring": lambda i: _link_exists(names.link_name(i.run_id, "lan")),
    "agent-starting": lambda i: (i.root / i.run_id / "agent.json").exists(),
    "tunnel-devices": lambda i: _link_exists(names.link_name(i.run_id, "0")),
    "test-running": lambda i: (i.directory / "phase-call").exists(),
}
SIGNALS = {"SIGINT-to-group": (signal.SIGINT, True), "SIGTERM-to-pid": (signal.SIGTERM, False)}


@pytest.mark.root
@pytest.mark.parametrize("how", list(SIGNALS))
@pytest.mark.parametrize("phase", list(SETUP_PHASES))
def test_signal_during_setup_leaves_nothing(inners: Inners, phase: str, how: str) -> None:
    signum, group = SIGNALS[how]
    inner = inners.start(INNER_SLEEP="30")
    wait_until(lambda: SETUP_PHASES[phase](inner) or inner.proc.poll() is not None, f"phase {phase}")
    assert inner.proc.poll() is None, f"the inner session ended before {phase}:\n{inner.output()}"
    inner.send(signum, group)
    for _ in range(2):  # a signal lost in a fork hook, see RESEND_AFTER_S
        with contextlib.suppress(subprocess.TimeoutExpired):
            inner.proc.wait(RESEND_AFTER_S)
        if inner.proc.poll() is not None or "KeyboardInterrupt" in inner.output():
            break
        inner.send(signum, group)
    inner.finish()
    output = inner.output()
    assert_nothing_left(inner.run_id, inner.root, output)
    interrupted_once(inner, output)
    if signum == signal.SIGTERM:
        assert "SIGTERM received; tearing down as on Ctrl-C" in output, output
    assert not (inner.directory / "phase-done").exists(), "the test ran to its end: the signal came too late"


# -- 2. a signal during teardown --------------------------------------------------------------------

# what the teardown does, in order: the test's last action, the external end's devices removed
# (the lab's removal comes next), the first lab namespace removed (the rest of the lab next)
TEARDOWN_PHASES: dict[str, Callable[[Inner], bool]] = {
    "test-done": lambda i: (i.directory / "phase-done").exists(),
    "devices-removed": lambda i: (
        (i.directory / "phase-done").exists() and not _link_exists(names.link_name(i.run_id, "0"))
    ),
    "lab-removal": lambda i: (
        (i.directory / "phase-done").exists() and not _netns_exists(names.netns_name(i.run_id, "home"))
    ),
}


@pytest.mark.root
@pytest.mark.parametrize("how", list(SIGNALS))
@pytest.mark.parametrize("phase", list(TEARDOWN_PHASES))
def test_signal_during_teardown_leaves_nothing(inners: Inners, phase: str, how: str) -> None:
    signum, group = SIGNALS[how]
    inner = inners.start()
    wait_until(lambda: TEARDOWN_PHASES[phase](inner) or inner.proc.poll() is not None, f"phase {phase}")
    assert inner.proc.poll() is None, f"the inner session ended before {phase}:\n{inner.output()}"
    inner.send(signum, group)
    inner.finish()
    output = inner.output()
    assert_nothing_left(inner.run_id, inner.root, output)
    interrupted_once(inner, output)
    if phase != "test-done":  # right after its last line the test may still count as interrupted
        assert "PASSED test_inner.py::test_uses_tunnel" in output, output


@pytest.mark.root
@pytest.mark.parametrize(
    ("phase", "phases", "sleep"),
    [("lab-wiring", SETUP_PHASES, "30"), ("devices-removed", TEARDOWN_PHASES, "0")],
    ids=["setup", "teardown"],
)
def test_repeated_signals_leave_nothing(
    inners: Inners, phase: str, phases: dict[str, Callable[[Inner], bool]], sleep: str
) -> None:
    """Impatient users press Ctrl-C twice, then send SIGTERM: cleanup still runs to its end.
    (How pytest itself ends then varies: signals that keep coming can hit its reporting, or
    its interpreter's shutdown; what counts is that the run stopped and left nothing.)"""
    inner = inners.start(INNER_SLEEP=sleep)
    wait_until(lambda: phases[phase](inner) or inner.proc.poll() is not None, f"phase {phase}")
    assert inner.proc.poll() is None, f"the inner session ended before {phase}:\n{inner.output()}"
    for signum, group in ((signal.SIGINT, True), (signal.SIGINT, True), (signal.SIGTERM, False)):
        inner.send(signum, group)
        time.sleep(0.03)
    inner.finish()
    output = inner.output()
    assert_nothing_left(inner.run_id, inner.root, output)
    assert inner.proc.returncode != pytest.ExitCode.OK, output


# -- 3. pytest-timeout (signal method) ----------------------------------------------------------------

TIMEOUTS = {
    # (timeout, environment, expected outcome line) - the timer covers setup, call and teardown;
    # in the test and in teardown the inner test re-arms the timer from its own start, so that
    # where the alarm lands does not depend on how long the setup took
    "in-setup": ("0.3", {"INNER_SLEEP": "30"}, "ERROR test_inner.py::test_uses_tunnel - Failed: Timeout"),
    "in-test": (
        "60",
        {"INNER_ALARM_IN": "0.5", "INNER_SLEEP": "30"},
        "FAILED test_inner.py::test_uses_tunnel - Failed: Timeout",
    ),
    # the test returns at once, leaving a process in the lab that ignores SIGTERM: the lab's
    # removal waits 5 s for it before SIGKILL, so an alarm 1 s later comes in the middle of it
    "in-teardown": (
        "60",
        {"INNER_ALARM_IN": "1", "INNER_STUBBORN": "1"},
        "ERROR test_inner.py::test_uses_tunnel - Failed: Timeout",
    ),
}


@pytest.mark.root
@pytest.mark.parametrize("case", list(TIMEOUTS))
def test_pytest_timeout_leaves_nothing(inners: Inners, case: str) -> None:
    timeout, env, outcome = TIMEOUTS[case]
    inner = inners.start("--timeout", timeout, "--timeout-method", "signal", **env)
    inner.finish()
    output = inner.output()
    assert_nothing_left(inner.run_id, inner.root, output)
    assert outcome in output, output
    assert not (inner.directory / "phase-done").exists() or case == "in-teardown", output
    if case == "in-teardown":
        assert "PASSED test_inner.py::test_uses_tunnel" in output, output
        stubborn = int((inner.directory / "stubborn-pid").read_text())
        left = ProcessRef.of(stubborn)
        assert left is None or not left.alive(), "the process in the lab outlived its teardown"


# -- 4. SIGKILL, and reaping ----------------------------------------------------------------------------


def tunnel_up_then_sigkill(inners: Inners, root: Path) -> Inner:
    """An inner session killed with SIGKILL while its tunnel carries traffic: all of it stays."""
    inner = inners.start(root=root, INNER_SLEEP="60")
    wait_until(lambda: (inner.directory / "phase-call").exists() or inner.proc.poll() is not None, "tunnel up")
    assert (inner.directory / "phase-call").read_text() == inner.run_id, inner.output()
    (inner.directory / "phase-call").unlink()
    inner.kill()
    left = leftovers(inner.run_id, root)
    assert len(left["namespaces"]) == 4 and left["agents"] and left["state dir"], left
    assert {names.link_name(inner.run_id, "lan"), names.link_name(inner.run_id, "0")} <= set(left["links"]), left
    return inner


def lab_up(root: Path) -> str:
    """A detached run, as 'svctunnel lab up' makes it; returns its run id."""
    done = svctunnel_cli(root, "lab", "up")
    assert done.returncode == 0, done.stderr
    match = _LAB_UP.search(done.stdout)
    assert match is not None, done.stdout
    return match["run"]


def lines(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


@pytest.mark.root
def test_reap_removes_exactly_what_sigkilled_runs_left(inners: Inners) -> None:
    root, other_root = inners.root("state"), inners.root("other-state")
    killed = tunnel_up_then_sigkill(inners, root)
    live = inners.start(root=root, INNER_SLEEP="60")  # a session that still runs
    wait_until(
        lambda: _link_exists(names.link_name(live.run_id, "0")) or live.proc.poll() is not None, "live tunnel up"
    )
    detached = lab_up(root)
    foreign = lab_up(other_root)  # a run of another state root: not ours to touch
    live_before = leftovers(live.run_id, root)
    detached_before = leftovers(detached, root)
    foreign_before = leftovers(foreign, other_root)
    # something else running in the killed run's lab, that no pid file names
    stray = subprocess.Popen(["ip", "netns", "exec", names.netns_name(killed.run_id, "node"), "sleep", "300"])
    wait_until(lambda: Path(f"/proc/{stray.pid}/comm").read_text().strip() == "sleep", "the stray process")

    dry = svctunnel_cli(root, "reap", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert [line.split(" (")[0] for line in lines(dry.stdout, "would reap")] == [f"would reap run {killed.run_id}"]
    assert names.netns_name(killed.run_id, "pod") in dry.stdout and names.link_name(killed.run_id, "lan") in dry.stdout
    assert re.search(rf"processes .*\b{stray.pid}\b", dry.stdout), dry.stdout
    assert stray.poll() is None, "a dry run stopped a process"
    assert not lines(dry.stdout, "reaped run")
    assert len(leftovers(killed.run_id, root)["namespaces"]) == 4, "a dry run removed something"

    reaped = svctunnel_cli(root, "reap")
    assert reaped.returncode == 0, reaped.stderr
    assert [line.split(" (")[0] for line in lines(reaped.stdout, "reaped run")] == [f"reaped run {killed.run_id}"]
    assert lines(reaped.stdout, f"left alone: run {live.run_id} (owner pid {live.proc.pid} is running")
    assert lines(reaped.stdout, f"left alone: run {detached} (detached")
    assert any(names.netns_name(foreign, "home") in line for line in lines(reaped.stdout, "not touched: "))
    assert_nothing_left(killed.run_id, root, reaped.stdout)
    assert stray.wait(WAIT_S) == -signal.SIGTERM, "the process in the gone run's namespace was not stopped"
    assert leftovers(live.run_id, root) == live_before
    assert leftovers(detached, root) == detached_before
    assert leftovers(foreign, other_root) == foreign_before

    again = svctunnel_cli(root, "reap")  # nothing left to do is success
    assert again.returncode == 0 and not lines(again.stdout, "reaped run"), again.stdout

    everything = svctunnel_cli(root, "reap", "--include-detached")
    assert everything.returncode == 0, everything.stderr
    assert [line.split(" (")[0] for line in lines(everything.stdout, "reaped run")] == [f"reaped run {detached}"]
    assert_nothing_left(detached, root, everything.stdout)
    assert leftovers(live.run_id, root) == live_before, "--include-detached touched a live run"
    assert leftovers(foreign, other_root) == foreign_before

    live.send(signal.SIGTERM, group=False)
    live.finish()
    interrupted_once(live, live.output())
    assert_nothing_left(live.run_id, root, live.output())
    assert svctunnel_cli(other_root, "lab", "down", "--run", foreign).returncode == 0
    assert_nothing_left(foreign, other_root)


@pytest.mark.root
def test_reap_option_reaps_at_session_start(inners: Inners, pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_quick=QUICK_SUITE)
    root = inners.root("state")
    killed = tunnel_up_then_sigkill(inners, root)
    detached = lab_up(root)
    detached_before = leftovers(detached, root)

    plain = inners.start("test_quick.py", root=root)
    assert plain.finish() == pytest.ExitCode.OK, plain.output()
    assert not lines(plain.output(), "svctunnel: reaped"), "reaped without --svctunnel-reap"
    assert len(leftovers(killed.run_id, root)["namespaces"]) == 4

    reaping = inners.start("test_quick.py", "--svctunnel-reap", "true", root=root)
    assert reaping.finish() == pytest.ExitCode.OK, reaping.output()
    output = reaping.output()
    assert [line.split(" (")[0] for line in lines(output, "svctunnel: reaped")] == [
        f"svctunnel: reaped run {killed.run_id}"
    ], output
    assert_nothing_left(killed.run_id, root, output)
    assert leftovers(detached, root) == detached_before, "the plugin reaped a detached run"
    assert svctunnel_cli(root, "lab", "down", "--run", detached).returncode == 0
    assert_nothing_left(detached, root)


# -- 5. gone or not: run ownership with real processes ------------------------------------------------


@pytest.fixture
def private_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv(STATE_ENV, str(tmp_path))
    return tmp_path


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def run_owned_by(owner: dict[str, object]) -> Run:
    run = Run.new()
    run.write(OWNER_FILE, owner)
    return run


def record(proc: subprocess.Popen[bytes], **changes: object) -> dict[str, object]:
    ref = ProcessRef.of(proc.pid)
    assert ref is not None
    return {"pid": ref.pid, "start_time": ref.start_time, "detached": False, **changes}


def test_new_run_is_owned_by_this_process(private_root: Path) -> None:
    run = Run.new()
    owner = run.owner()
    assert owner is not None and owner.process == ProcessRef.current() and not owner.detached
    stat = proc_stat(os.getpid())
    assert stat is not None and owner.process.start_time == stat.start_time
    assert not run.liveness().gone


def test_live_owner_is_not_gone(private_root: Path, sleeper: subprocess.Popen[bytes]) -> None:
    liveness = run_owned_by(record(sleeper)).liveness()
    assert liveness.owner_alive and not liveness.gone, liveness


def test_exited_owner_is_gone(private_root: Path, sleeper: subprocess.Popen[bytes]) -> None:
    run = run_owned_by(record(sleeper))
    sleeper.kill()
    sleeper.wait()
    assert run.liveness().gone, run.liveness()
    assert "exited" in run.liveness().reason


def test_zombie_owner_is_gone(private_root: Path, sleeper: subprocess.Popen[bytes]) -> None:
    run = run_owned_by(record(sleeper))
    sleeper.kill()
    wait_until(lambda: (s := proc_stat(sleeper.pid)) is not None and s.state == "Z", "a zombie")
    assert run.liveness().gone, run.liveness()


def test_reused_pid_is_gone(private_root: Path, sleeper: subprocess.Popen[bytes]) -> None:
    """A live process with the recorded pid but another start time is someone else: the owner is gone."""
    recorded = record(sleeper)
    run = run_owned_by({**recorded, "start_time": int(str(recorded["start_time"])) - 1})
    assert ProcessRef(sleeper.pid, None).alive()
    assert run.liveness().gone, run.liveness()
    assert "started later" in run.liveness().reason


def test_detached_run_is_never_gone(private_root: Path, sleeper: subprocess.Popen[bytes]) -> None:
    run = run_owned_by(record(sleeper))
    run.detach()
    sleeper.kill()
    sleeper.wait()
    liveness = run.liveness()
    assert liveness.detached and not liveness.owner_alive and not liveness.gone, liveness
    assert [v.reap for v in reaper.Reaper().verdicts()] == [False]
    assert [v.reap for v in reaper.Reaper(include_detached=True).verdicts()] == [True]


def test_detached_run_of_a_live_owner_is_not_reaped_even_with_include_detached(
    private_root: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    run_owned_by(record(sleeper, detached=True))
    assert [v.reap for v in reaper.Reaper(include_detached=True).verdicts()] == [False]


def test_owner_record_without_start_time_uses_the_pid(private_root: Path, sleeper: subprocess.Popen[bytes]) -> None:
    run = run_owned_by({"pid": sleeper.pid})
    assert not run.liveness().gone
    sleeper.kill()
    sleeper.wait()
    assert run.liveness().gone


def test_ownerless_run_is_gone_only_after_a_grace(private_root: Path) -> None:
    run = Run.new()
    (run.dir / OWNER_FILE).unlink()
    assert not run.liveness().gone, "a run being created counted as gone"
    old = time.time() - OWNERLESS_GRACE_S - 5
    os.utime(run.dir, (old, old))
    assert run.liveness().gone


# a process that keeps SIGTERM pending: whether anyone sent it one shows in /proc, at once
TERM_BLOCKER = (
    "import signal, sys, time; signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM});"
    " print('blocked', flush=True); time.sleep(60)"
)


def sigterm_pending(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    pending = [int(line.split()[1], 16) for line in status if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask & (1 << (signal.SIGTERM - 1)) for mask in pending)


def test_agent_stop_signals_the_recorded_process(private_root: Path, sleeper: subprocess.Popen[bytes]) -> None:
    """'lab down' and 'reap' stop an agent by its pid file."""
    run = Run.new()
    run.write("agent.json", record(sleeper))
    agent = LabAgent(run, "unused")
    assert agent.alive()
    agent.stop(timeout=5)
    assert sleeper.wait(WAIT_S) == -signal.SIGTERM
    assert not (run.dir / "agent.json").exists()


def test_agent_stop_never_signals_a_process_that_got_the_pid_later(private_root: Path) -> None:
    blocker = subprocess.Popen([sys.executable, "-c", TERM_BLOCKER], stdout=subprocess.PIPE)
    try:
        assert blocker.stdout is not None and blocker.stdout.readline() == b"blocked\n"
        assert not sigterm_pending(blocker.pid)
        recorded = record(blocker)
        run = Run.new()
        run.write("agent.json", {**recorded, "start_time": int(str(recorded["start_time"])) - 1})
        agent = LabAgent(run, "unused")
        assert not agent.alive()
        agent.stop(timeout=5)
        assert not sigterm_pending(blocker.pid), "stopped a process that only has the agent's old pid"
        assert not (run.dir / "agent.json").exists()
        os.kill(blocker.pid, signal.SIGTERM)  # control: a SIGTERM that is sent shows as pending
        assert sigterm_pending(blocker.pid)
    finally:
        blocker.kill()
        blocker.wait()


def test_reaper_only_considers_run_directories(private_root: Path, sleeper: subprocess.Popen[bytes]) -> None:
    (private_root / "not-a-run").mkdir()
    run = run_owned_by(record(sleeper))
    assert [v.run.id for v in reaper.Reaper().verdicts()] == [run.id]


# -- 6. the shield and the interrupt handlers, in their own processes -------------------------------------

SHIELD_SCRIPT = """
import os, signal, threading, time
from pytest_svctunnel.shield import shield

events = []
signal.signal(signal.SIGTERM, lambda s, f: events.append("SIGTERM handler"))
signal.signal(signal.SIGALRM, lambda s, f: events.append("SIGALRM handler"))
keeper = threading.Event()
threading.Thread(target=keeper.wait, daemon=True).start()  # a thread that does not block signals
try:
    with shield():
        with shield():
            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGALRM):
                os.kill(os.getpid(), signum)
            time.sleep(0.3)
        events.append("cleanup done")
except KeyboardInterrupt:
    events.append("KeyboardInterrupt")
deadline = time.monotonic() + 10  # the deferred handlers run once the shield is down
while len(events) < 4 and time.monotonic() < deadline:
    time.sleep(0.01)
print("events:", ", ".join(events))
print("blocked after:", sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
print("SIGINT handler restored:", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
"""


def test_shield_defers_signals_until_cleanup_is_done() -> None:
    done = subprocess.run([sys.executable, "-c", SHIELD_SCRIPT], capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr
    events, blocked, restored = done.stdout.splitlines()
    assert events.startswith("events: cleanup done, "), done.stdout
    assert sorted(events.split(": ")[1].split(", ")[1:]) == ["KeyboardInterrupt", "SIGALRM handler", "SIGTERM handler"]
    assert blocked == "blocked after: []", done.stdout
    assert restored == "SIGINT handler restored: True", done.stdout


def test_shield_outside_the_main_thread_does_nothing() -> None:
    script = """
import signal, threading
from pytest_svctunnel.shield import shield
seen = []
def worker():
    with shield():
        seen.append(signal.pthread_sigmask(signal.SIG_BLOCK, []))
t = threading.Thread(target=worker); t.start(); t.join()
print(seen == [set()])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S)
    assert done.stdout.strip() == "True", done.stdout + done.stderr


INTERRUPT_SUITE = """
import os, signal, time
import pytest
from pytest_svctunnel.interrupts import InterruptThisProcess

CUSTOM = os.environ["INNER_HANDLERS"] == "custom"  # the caller handles SIGTERM itself

def test_handlers():
    assert isinstance(signal.getsignal(signal.SIGINT), InterruptThisProcess)
    assert isinstance(signal.getsignal(signal.SIGTERM), InterruptThisProcess) != CUSTOM

@pytest.mark.skipif(CUSTOM, reason="SIGTERM is the caller's")
def test_sigterm_interrupts():
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)

def test_a_forked_copy_gets_the_default_action():
    for signum in (signal.SIGINT,) if CUSTOM else (signal.SIGINT, signal.SIGTERM):
        ready, tell = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.write(tell, b"x")
                time.sleep(5)
            except BaseException:
                os._exit(3)  # a KeyboardInterrupt here would run the rest of pytest in the copy
            os._exit(0)
        os.close(tell)
        assert os.read(ready, 1) == b"x"  # the copy is inside its try
        os.close(ready)
        os.kill(pid, signum)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signum, status
"""

INTERRUPT_SCRIPT = """
import signal, sys, threading, pytest
custom = sys.argv[2] == "custom"
if custom:
    signal.signal(signal.SIGTERM, lambda s, f: None)
before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
args = [sys.argv[1], "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]
if sys.argv[3] == "thread":
    codes = []
    t = threading.Thread(target=lambda: codes.append(pytest.main(args + ["-k", "nothing"])))
    t.start(); t.join()
    code = 0 if codes == [pytest.ExitCode.NO_TESTS_COLLECTED] else 1
else:
    code = pytest.main(args)
after = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
print("restored" if after == before else f"changed {before} -> {after}")
sys.exit(int(code))
"""


@pytest.mark.parametrize(
    ("handlers", "thread"), [("default", "main"), ("custom", "main"), ("default", "thread")], ids=str
)
def test_sigint_and_sigterm_interrupt_pytest_itself_only(pytester: pytest.Pytester, handlers: str, thread: str) -> None:
    suite = pytester.makepyfile(test_interrupts=INTERRUPT_SUITE)
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPT_SCRIPT, str(suite), handlers, thread],
        capture_output=True,
        text=True,
        timeout=WAIT_S,
        cwd=pytester.path,
        env={**os.environ, "INNER_HANDLERS": handlers},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "restored", done.stdout
    if thread == "main":
        assert re.search(r"\b3 passed\b" if handlers == "default" else r"\b2 passed, 1 skipped\b", done.stdout)


FORK_SCRIPT = """
import os, signal, time
from pytest_svctunnel import interrupts

# a Python fork hook registered earlier, like logging's; a signal arrives while it runs
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))
interrupts.guard_forks()
try:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.2)
    print("lost")
except KeyboardInterrupt:
    print("interrupted right after fork")
print("blocked after:", sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
"""


def test_signal_during_fork_hooks_is_not_lost() -> None:
    """CPython drops what a handler raises inside a fork hook; the guard keeps the signal pending
    until fork() has returned (pyroute2 forks for every namespace it opens)."""
    done = subprocess.run([sys.executable, "-c", FORK_SCRIPT], capture_output=True, text=True, timeout=WAIT_S)
    assert done.stdout.splitlines() == ["interrupted right after fork", "blocked after: []"], done.stdout + done.stderr


@pytest.mark.root
def test_lab_block_avoids_addresses_in_use_on_this_host(private_root: Path) -> None:
    """A lab of another state root (another session's) is invisible to this root's runs; its
    addresses are not: a new lab must not pick its block (routes would clash with EEXIST)."""
    run = Run.new()
    wanted = 1 + int(run.id, 16) % 250  # the block this run would pick first
    blocker = names.link_name(run.id, "blk")
    peer = names.link_name(run.id, "blp")
    subprocess.run(["ip", "link", "add", blocker, "type", "veth", "peer", "name", peer], check=True)
    try:
        subprocess.run(["ip", "addr", "add", f"198.18.{wanted}.254/32", "dev", blocker], check=True)
        assert Lab(run).plan.block != wanted
    finally:
        subprocess.run(["ip", "link", "del", blocker], check=True)


class _FailingDeploy:
    """A backend whose deploy fails after teardown was registered; its teardown may fail too
    (pure logic of the undo order: the real removal paths are tested above)."""

    def __init__(self, teardown_fails: bool) -> None:
        self.teardown_fails = teardown_fails

    def deploy(self, *_args: object) -> None:
        raise RuntimeError("deploy failed")

    def teardown(self, _deadline: object) -> None:
        if self.teardown_fails:
            raise RuntimeError("teardown failed")

    def diagnostics(self) -> list[tuple[str, str]]:
        return []


@pytest.mark.root
@pytest.mark.parametrize("teardown_fails", [False, True], ids=["clean-undo", "failed-undo"])
def test_run_record_stays_when_its_removal_failed(
    private_root: Path, monkeypatch: pytest.MonkeyPatch, teardown_fails: bool
) -> None:
    """A run whose removal failed stays on record (for 'svctunnel reap'); a clean one is forgotten."""
    from pytest_svctunnel import session as session_module
    from pytest_svctunnel.config import resolve
    from pytest_svctunnel.networks import session_plan

    monkeypatch.setattr(session_module, "make_backend", lambda _config, _run: _FailingDeploy(teardown_fails))
    run_id = new_run_id()
    config = resolve({}, {}, {})
    tunnel_session = session_module.TunnelSession(config, session_plan(config, run_id), run_id)
    with pytest.raises(RuntimeError, match="teardown failed" if teardown_fails else "deploy failed"):
        tunnel_session.start()
    assert tunnel_session.teardown_failed is teardown_fails
    assert (private_root / run_id).is_dir() is teardown_fails


UNFORMATTABLE_CONFTEST = """
import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_keyboard_interrupt(excinfo):
    # what pytest's terminal reporter raises for an interrupt at an instruction without a line number
    raise TypeError("unsupported operand type(s) for -: 'NoneType' and 'int'")
"""


def test_an_interrupt_pytest_cannot_format_still_ends_as_interrupted(pytester: pytest.Pytester) -> None:
    """Python 3.11 can leave an interrupt's traceback without a line number; pytest's reporter then
    raises TypeError and the run exits 1. The plugin keeps the run 'interrupted' with a plain line."""
    pytester.makeconftest(UNFORMATTABLE_CONFTEST)
    pytester.makepyfile(test_stop="def test_stop():\n    raise KeyboardInterrupt('SIGTERM received')\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--svctunnel-backend", "lab")
    assert result.ret == INTERRUPTED, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["*! KeyboardInterrupt: SIGTERM received !*", "*test_stop.py:2: KeyboardInterrupt*"])
    assert "Traceback" not in result.stderr.str(), result.stderr.str()
    without = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:svctunnel")
    assert without.ret not in (INTERRUPTED, pytest.ExitCode.OK), "the simulated fault must break pytest without us"


HOLE_SUITE = """
import sys, types
import pytest


@pytest.fixture
def alarmed():
    # what pytest-timeout's alarm can leave in a fixture's setup on Python 3.11: a traceback entry at
    # an instruction without a line number (made here with an offset past the end of the code)
    try:
        raise pytest.fail.Exception("Timeout (>0.3s) from pytest-timeout.", pytrace=True)
    except BaseException as exc:
        hole = types.TracebackType(None, sys._getframe(), 10**6, -1)
        assert hole.tb_lineno is None
        tb = exc.__traceback__
        raise exc.with_traceback(types.TracebackType(hole, tb.tb_frame, tb.tb_lasti, tb.tb_lineno))


def test_setup_times_out(alarmed):
    pass
"""


def _makes_holes() -> bool:
    """Whether this Python reports a traceback entry past its code's end without a line number (None):
    3.11 since 3.11.4 does; earlier ones say -1, which pytest formats, so the hole cannot happen there."""
    return types.TracebackType(None, sys._getframe(), 10**6, -1).tb_lineno is None


def test_a_setup_failure_pytest_cannot_format_still_fails_the_test(pytester: pytest.Pytester) -> None:
    """pytest's report of a setup failure crashed (INTERNALERROR, exit 3) on a traceback entry
    without a line number; the plugin reports the failure without that entry."""
    if not _makes_holes():
        pytest.skip(f"Python {sys.version.split()[0]} never leaves a traceback entry without a line number")
    pytester.makepyfile(test_hole=HOLE_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rA")
    assert result.ret == pytest.ExitCode.TESTS_FAILED, result.stdout.str() + result.stderr.str()
    result.stdout.fnmatch_lines(["ERROR test_hole.py::test_setup_times_out - Failed: Timeout*"])
    without = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:svctunnel")
    assert without.ret == pytest.ExitCode.INTERNAL_ERROR, "the simulated hole must break pytest without us"
