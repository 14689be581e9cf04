"""Run identity: every namespace, link and object a run creates carries its id.

A run's state directory (on disk, under the state root) holds its owner record, and what
its parts record there: the lab's description, key and agent log, the Kubernetes objects
of a kubernetes backend run. ``svctunnel lab down`` and the reaper find a run by it; the
names of what a run creates come from its id (``names``). Its owner
record (``owner.json``: pid, the pid's start time, and whether the run is detached)
tells whether the run is gone: not detached, and its owner process no longer runs.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import StateError
from .names import new_run_id
from .pids import ProcessRef

STATE_ENV = "SVCTUNNEL_STATE_DIR"
_DEFAULT_ROOT = "/run/svctunnel"  # root's; every other user has one of its own (``state_root``)
OWNER_FILE = "owner.json"
KUBE_FILE = "kube.json"  # the cluster objects of a kubernetes backend run, for reaping
INJECTED_PREFIX = "injected-"  # one record per agent injected into a user's pod, for reaping
# a state directory without an owner record is being created, unless it has not changed for this long
OWNERLESS_GRACE_S = 60.0


def state_root() -> Path:
    """Where runs keep their state: $SVCTUNNEL_STATE_DIR if set; else /run/svctunnel for root; else
    the user's own, ``$XDG_RUNTIME_DIR/svctunnel`` or ``/tmp/svctunnel-UID``."""
    given = os.environ.get(STATE_ENV)
    if given:
        return Path(given)
    if os.geteuid() == 0:
        return Path(_DEFAULT_ROOT)
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if runtime and os.path.isabs(runtime):
        return Path(runtime) / "svctunnel"
    return Path(tempfile.gettempdir()) / f"svctunnel-{os.geteuid()}"


def usable_root() -> Path:
    """The state root, checked: missing (nothing recorded yet) is fine; one this user cannot read and
    write, or (a per-user default) one another user made, is a StateError that says what to do."""
    root = state_root()
    try:
        info = root.stat()
    except FileNotFoundError:
        return root
    except OSError as exc:
        raise _unusable(root, f"cannot be reached ({exc.strerror})") from None
    euid = os.geteuid()
    if not stat.S_ISDIR(info.st_mode):
        raise _unusable(root, "is not a directory")
    if euid != 0 and info.st_uid != euid and not os.environ.get(STATE_ENV):
        raise StateError(
            f"the state directory {root} belongs to uid {info.st_uid}, not to this user (uid {euid}), who"
            f" would use it by default: have it removed, or set {STATE_ENV} to a directory of your own"
        )
    if not os.access(root, os.R_OK | os.W_OK | os.X_OK):
        mode = stat.S_IMODE(info.st_mode)
        owner = f"belongs to uid {info.st_uid} with mode {mode:04o}"
        raise _unusable(root, f"{owner}; this user (uid {euid}) cannot use it")
    return root


def _unusable(root: Path, why: str) -> StateError:
    return StateError(
        f"the state directory {root} {why}: run as the user whose runs it holds (root's: 'sudo -E ...'),"
        f" or set {STATE_ENV} to a directory of your own"
    )


@dataclass(frozen=True)
class Owner:
    """The process a run belongs to. A detached run outlives it on purpose (``svctunnel lab up``,
    a session kept with --svctunnel-keep) and is removed by ``svctunnel lab down``."""

    process: ProcessRef
    detached: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.process.pid, "start_time": self.process.start_time, "detached": self.detached}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Owner | None:
        """The owner in a record; None if it is not one (a start time of None: an older record)."""
        pid, start, detached = data.get("pid"), data.get("start_time"), data.get("detached", False)
        if not isinstance(pid, int) or not (start is None or isinstance(start, int)) or not isinstance(detached, bool):
            return None
        return cls(ProcessRef(pid, start), detached)


@dataclass(frozen=True)
class Liveness:
    """Whether a run's owner still runs, whether the run is detached, and why, in words."""

    owner_alive: bool
    detached: bool
    reason: str

    @property
    def gone(self) -> bool:
        """Nothing will remove this run's objects any more: ``svctunnel reap`` may."""
        return not self.owner_alive and not self.detached


@dataclass(frozen=True)
class Run:
    """One run: a 6-hex-digit id and its private state directory."""

    id: str
    dir: Path

    @classmethod
    def new(cls) -> Run:
        while True:
            try:
                return cls.create(new_run_id())
            except FileExistsError:
                continue

    @classmethod
    def create(cls, run_id: str) -> Run:
        """Make the state directory of ``run_id``; FileExistsError if it is taken."""
        root = usable_root()
        try:
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
        except PermissionError as exc:
            raise _unusable(root, f"cannot be made ({exc.strerror})") from None
        path = root / run_id
        path.mkdir(mode=0o700)
        run = cls(run_id, path)
        run.write(OWNER_FILE, Owner(ProcessRef.current()).to_json())
        return run

    @classmethod
    def existing(cls, run_id: str) -> Run:
        """The run ``run_id`` under the state root (its directory may be gone); a StateError if
        this user cannot use the state root."""
        return cls(run_id, usable_root() / run_id)

    def write(self, name: str, data: dict[str, Any]) -> None:
        """Replace ``name`` in the state directory at once: a reader sees the old or the new file."""
        temporary = self.dir / f".{name}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        os.replace(temporary, self.dir / name)

    def read(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / name).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def forget(self, name: str) -> None:
        """Remove one record from the state directory (gone already is fine)."""
        (self.dir / name).unlink(missing_ok=True)

    def records(self, prefix: str) -> list[str]:
        """The names of the records that start with ``prefix``, sorted."""
        if not self.dir.is_dir():
            return []
        return sorted(p.name for p in self.dir.iterdir() if p.name.startswith(prefix) and p.suffix == ".json")

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def owner(self) -> Owner | None:
        data = self.read(OWNER_FILE)
        return Owner.from_json(data) if data is not None else None

    def detach(self) -> None:
        """Mark the run as meant to outlive its owner; ``svctunnel reap`` then leaves it alone."""
        owner = self.owner() or Owner(ProcessRef.current())
        self.write(OWNER_FILE, Owner(owner.process, detached=True).to_json())

    def liveness(self) -> Liveness:
        owner = self.owner()
        if owner is None:
            return self._ownerless()
        alive = owner.process.alive()
        what = f"owner {owner.process.describe()}"
        if owner.detached:
            what = f"detached ('svctunnel lab up' or a kept session); {what}"
        return Liveness(alive, owner.detached, what)

    def _ownerless(self) -> Liveness:
        try:
            idle = time.time() - self.dir.stat().st_mtime
        except FileNotFoundError:  # its owner removed it just now, at the end of its teardown
            return Liveness(True, False, "state directory removed meanwhile")
        if idle < OWNERLESS_GRACE_S:
            return Liveness(True, False, f"no owner record yet, changed {idle:.0f} s ago (being created)")
        return Liveness(False, False, f"no owner record, unchanged for {idle:.0f} s")


def all_runs() -> list[Run]:
    """Every run on record under the state root; a StateError if this user cannot use it."""
    root = usable_root()
    if not root.is_dir():
        return []
    return [Run(p.name, p) for p in sorted(root.iterdir()) if p.is_dir()]
