"""One tunnel set for every pytest-xdist worker of a run.

Under xdist the controller collects nothing: the marks, and so the plan, are known only in the
workers. And a worker that built the tunnel would take it down with its own session while the
others still run tests. So the controller makes the run (its id is in the report header and in
every worker's ``workerinput``); the first worker that needs the tunnel starts a keeper process
(``python -m pytest_svctunnel.keeper RUN_DIR``) under a lock in the run's state directory, with
the plan; the keeper builds the tunnel once, records it, and holds it until the controller stops
it after the last worker finished (``stop``), or until the controller is gone (Ctrl-C, SIGKILL).
Every worker reads the record: one run, one set of devices and Services, one teardown.
"""

from __future__ import annotations

import fcntl
import os
import pickle
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SvcTunnelError, WaitTimeout
from .pids import ProcessRef
from .runs import Run
from .waiting import Deadline

if TYPE_CHECKING:
    from .config import TunnelConfig
    from .networks import Plan
    from .session import Tunnel

KEEPER_INPUT = "keeper-input.pickle"  # the worker's settings and plan
KEEPER = "keeper.json"  # the keeper process
BUILT = "tunnel.pickle"  # what it built, for the workers
FAILED = "keeper-failed.json"  # why it could not build
FINISH = "finish.json"  # from the controller: whether the session failed (for --svctunnel-keep)
DONE = "keeper-done.json"  # from the keeper: kept or not, removed cleanly or not
LOG = "keeper.log"
_LOCK = "keeper.lock"
_STOP_GRACE_S = 30.0  # beyond the teardown's own deadlines


class SharedError(SvcTunnelError):
    """The shared tunnel could not be built or reached."""


@dataclass(frozen=True)
class Built:
    """What the keeper built: the tunnel every worker's ``svctunnel`` fixture yields, and its setup
    time by phase (the controller prints it once)."""

    tunnel: Tunnel
    setup: str


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # held only while one worker starts the keeper: short
        yield
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def attach(run: Run, config: TunnelConfig, plan: Plan) -> Built:
    """The run's tunnel, built by its keeper: started here if no worker did it before."""
    with _locked(run.dir / _LOCK):
        if run.read(KEEPER) is None:
            _start_keeper(run, config, plan)
    return _wait_built(run, Deadline.after(_build_budget(config)))


def _build_budget(config: TunnelConfig) -> float:
    """Setup has several phases with a deadline each; a worker waits for all of them."""
    return 6 * config.timeout


def _start_keeper(run: Run, config: TunnelConfig, plan: Plan) -> None:
    _write_atomic(run.dir / KEEPER_INPUT, pickle.dumps((config, plan)))
    with (run.dir / LOG).open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pytest_svctunnel.keeper", str(run.dir)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,  # neither a worker's end nor a terminal's Ctrl-C reaches it directly
        )
    ref = ProcessRef.of(process.pid) or ProcessRef(process.pid, None)
    run.write(KEEPER, {"pid": ref.pid, "start_time": ref.start_time})


def _keeper(run: Run) -> ProcessRef | None:
    data = run.read(KEEPER)
    if data is None or not isinstance(data.get("pid"), int):
        return None
    start = data.get("start_time")
    return ProcessRef(data["pid"], start if isinstance(start, int) else None)


def _wait_built(run: Run, deadline: Deadline) -> Built:
    keeper = _keeper(run)
    while True:
        if (run.dir / BUILT).exists():
            built = pickle.loads((run.dir / BUILT).read_bytes())
            assert isinstance(built, Built)
            return built
        failed = run.read(FAILED)
        if failed is not None:
            raise SharedError(str(failed.get("error", "the shared tunnel could not be built")))
        if keeper is not None and not keeper.alive():
            raise SharedError(f"the keeper of the shared tunnel exited before building it; its log:\n{log_tail(run)}")
        if deadline.expired():
            raise WaitTimeout("shared tunnel", deadline.seconds, "not built yet", f"the keeper's log:\n{log_tail(run)}")
        time.sleep(0.05)


def log_tail(run: Run, lines: int = 30) -> str:
    try:
        return "\n".join((run.dir / LOG).read_text(errors="replace").splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(no log)"


def setup_note(run: Run) -> str | None:
    """The shared tunnel's setup time by phase, once it was built."""
    try:
        built = pickle.loads((run.dir / BUILT).read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError):
        return None
    return built.setup if isinstance(built, Built) else None


@dataclass(frozen=True)
class Stopped:
    """How the keeper ended: the note of what it kept (--svctunnel-keep), or whether its teardown
    failed (then the run stays for 'svctunnel reap')."""

    kept: str | None = None
    teardown_failed: bool = False


def stop(run: Run, failed: bool, config: TunnelConfig) -> Stopped | None:
    """From the controller, after every worker finished: end the keeper (the teardown is its own)
    and wait for it; None if no worker ever asked for the tunnel."""
    keeper = _keeper(run)
    if keeper is None:
        return None
    run.write(FINISH, {"failed": failed})
    deadline = Deadline.after(_build_budget(config) + _STOP_GRACE_S)
    if keeper.alive():
        keeper.signal(signal.SIGTERM)
    while keeper.alive():
        if deadline.expired():
            keeper.signal(signal.SIGKILL)
            return Stopped(teardown_failed=True)
        time.sleep(0.05)
    done = run.read(DONE)
    if done is None:
        return Stopped(teardown_failed=(run.dir / BUILT).exists())
    kept = done.get("kept")
    return Stopped(kept if isinstance(kept, str) else None, bool(done.get("teardown_failed")))


def record_failure(run: Run, error: str, diagnostics: str) -> None:
    run.write(FAILED, {"error": error, "diagnostics": diagnostics})


def record_built(run: Run, built: Built) -> None:
    _write_atomic(run.dir / BUILT, pickle.dumps(built))


def record_done(run: Run, kept: str | None, teardown_failed: bool) -> None:
    run.write(DONE, {"kept": kept, "teardown_failed": teardown_failed})


def finish_says_failed(run: Run) -> bool:
    """What the controller said about the session; a controller that said nothing is gone, and a
    session cut short counts as failed."""
    data: dict[str, Any] | None = run.read(FINISH)
    return bool(data.get("failed", True)) if data is not None else True


def diagnostics(run: Run) -> str:
    """For a failing test in a worker: this host's devices of the run and the keeper's log tail."""
    from . import diagnostics as parts
    from .names import link_prefix

    links = parts.safely("external end links", lambda: parts.local_links(link_prefix(run.id)))
    return parts.render([links, ("shared tunnel keeper log (tail)", log_tail(run))])
