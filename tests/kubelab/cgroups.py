"""The cgroup of one test node: everything the node runs (containerd, its shims, the kubelet, every container)
lives in one cgroup tree named after the node, in every cgroup v1 hierarchy, so that it can be counted, killed
and removed by name, also after a test run that crashed.

The tree sits below this process's own memory cgroup, so the pods count towards the memory of the session that
made them; the same path is made in the other hierarchies (with cpuset's CPUs and memory nodes copied down each
new level, as the kernel wants before a task may join). The kubelet gets it as its ``cgroupRoot``.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pytest_svctunnel.errors import LabError
from pytest_svctunnel.waiting import Deadline

MOUNTINFO = Path("/proc/self/mountinfo")
_NODE_NAME = re.compile(r"^svt-(?P<run>[0-9a-f]{6})-node\w*$")
_KILL_POLL_S = 0.05


def hierarchies() -> list[Path]:
    """The mount point of every cgroup hierarchy here: each v1 hierarchy, and the (hybrid) v2 one if any."""
    return list(_mounts())


def _mounts() -> dict[Path, frozenset[str]]:
    """Each cgroup mount point with its controllers (empty for v2), one per hierarchy."""
    found: dict[str, tuple[Path, frozenset[str]]] = {}
    for line in MOUNTINFO.read_text().splitlines():
        mount, _, fs = line.partition(" - ")
        kind, _, rest = fs.partition(" ")
        if kind in ("cgroup", "cgroup2"):
            fields = mount.split()
            options = rest.split()[1].split(",") if kind == "cgroup" else []
            found.setdefault(fields[2], (Path(fields[4]), frozenset(options)))  # by device: one may be mounted twice
    return dict(found.values())


def own_paths() -> dict[Path, str]:
    """This process's cgroup in each hierarchy, by mount point."""
    paths: dict[Path, str] = {}
    lines = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    for mount, options in _mounts().items():
        for _, controllers, path in lines:
            wanted = set(controllers.split(",")) - {""}
            if (wanted and wanted <= options) or (not wanted and not options):
                paths[mount] = path
    return paths


def own_path(controller: str = "memory") -> str:
    """This process's cgroup in the hierarchy of ``controller`` ("/" when it is not mounted as v1)."""
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controller in controllers.split(","):
            return path
    return "/"


class NodeCgroup:
    """The cgroup ``<this process's memory cgroup>/<name>`` in every v1 hierarchy."""

    def __init__(self, name: str, parent: str | None = None) -> None:
        self.name = name
        self.path = f"{(parent if parent is not None else own_path()).rstrip('/')}/{name}"

    def dirs(self) -> list[Path]:
        return [mount / self.path.lstrip("/") for mount in hierarchies()]

    def create(self) -> None:
        """Make the path in every hierarchy; parents that are missing too are made (and removed again later)."""
        if not any(fs == "cgroup" for fs in _filesystems()):
            raise LabError(
                "no cgroup v1 hierarchy is mounted here; the test cluster's kubelet runs with the cgroupfs driver on "
                "cgroup v1 (mount them, or run the tests on a machine that has them)"
            )
        for mount in hierarchies():
            directory = mount
            for part in self.path.strip("/").split("/"):
                directory = directory / part
                if directory.is_dir():
                    continue
                with contextlib.suppress(FileExistsError):  # another node of this cluster made it just now
                    directory.mkdir()
                _inherit_cpuset(directory)

    def enter_command(self) -> str:
        """A shell fragment that moves the shell running it into this cgroup (then exec the program)."""
        files = " ".join(f"'{d / 'cgroup.procs'}'" for d in self.dirs())
        return f'for f in {files}; do echo $$ > "$f"; done'

    def pids(self) -> set[int]:
        return {pid for directory in self.dirs() for pid in _tree_pids(directory)}

    def remove(self, deadline: Deadline) -> None:
        """SIGKILL every process in the tree, then remove its cgroups leaf-first, and the parents made for it."""
        roots = self.dirs()
        kill_tree(roots, deadline, what=f"node cgroup {self.path}")
        for root in roots:
            remove_empty_parents(root)


def kill_tree(roots: list[Path], deadline: Deadline, what: str) -> None:
    """SIGKILL every process in the cgroup trees ``roots`` until none is left, then rmdir them leaf-first."""
    existing = [root for root in roots if root.is_dir()]
    pids: set[int] = set()
    while True:
        pids = {pid for root in existing for pid in _tree_pids(root)}
        if not pids:
            break
        if deadline.expired():
            raise LabError(f"{what}: processes {sorted(pids)} survive SIGKILL; they may be stuck in the kernel")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(_KILL_POLL_S)
    for root in existing:
        for directory in sorted(_walk(root), key=lambda p: len(p.parts), reverse=True):
            _rmdir(directory, deadline, what)


def reap_crashed(alive: Callable[[str], bool], deadline: Deadline) -> list[str]:
    """Kill and remove the node cgroups (``svt-<run>-node...``) of runs that ``alive`` says are gone: what a test
    run that crashed left running. Returns their paths."""
    reaped: list[str] = []
    for mount in hierarchies():
        for directory in _node_cgroups(mount):
            match = _NODE_NAME.match(directory.name)
            if match is None or alive(match["run"]):
                continue
            kill_tree([directory], deadline, what=f"leftover node cgroup {directory}")
            remove_empty_parents(directory)
            reaped.append(str(directory))
    return reaped


def parent_dirs() -> list[Path]:
    """The directories a node cgroup's path passes through, in every hierarchy (they may be missing)."""
    parent = Path(own_path().lstrip("/"))
    levels = [parent, *list(parent.parents)[:-1]]  # without the hierarchy's root itself
    return [mount / level for mount in hierarchies() for level in levels if str(level) != "."]


def remove_empty_parents(directory: Path) -> None:
    """Remove the parents a node's cgroup was given (a copy of this process's memory cgroup path in the other
    hierarchies) once they are empty; never this process's own cgroup or its parents in any hierarchy."""
    mount = next((m for m in hierarchies() if directory.is_relative_to(m)), None)
    if mount is None:
        return
    own = mount / own_paths().get(mount, "/").lstrip("/")
    protected = {own, *own.parents}
    for parent in directory.parents:
        if parent == mount or not parent.is_relative_to(mount) or parent in protected:
            return
        try:
            parent.rmdir()
        except OSError:  # in use (another node, another process): so are its parents
            return


def _node_cgroups(mount: Path, depth: int = 4) -> Iterator[Path]:
    """Directories named like a node's cgroup, at most ``depth`` levels below ``mount``."""
    level = [mount]
    for _ in range(depth):
        below: list[Path] = []
        for directory in level:
            with contextlib.suppress(OSError):
                for child in directory.iterdir():
                    if not child.is_dir():
                        continue
                    if _NODE_NAME.match(child.name):
                        yield child
                    else:
                        below.append(child)
        level = below


def _filesystems() -> list[str]:
    return [line.partition(" - ")[2].split(" ", 1)[0] for line in MOUNTINFO.read_text().splitlines()]


def _inherit_cpuset(directory: Path) -> None:
    for name in ("cpuset.cpus", "cpuset.mems"):
        mine, parents = directory / name, directory.parent / name
        if mine.exists() and not mine.read_text().strip():
            mine.write_text(parents.read_text())


def _walk(root: Path) -> list[Path]:
    found = [root]
    with contextlib.suppress(OSError):
        for child in root.iterdir():
            if child.is_dir():
                found += _walk(child)
    return found


def _tree_pids(root: Path) -> set[int]:
    pids: set[int] = set()
    for directory in _walk(root):
        with contextlib.suppress(OSError):
            pids |= {int(p) for p in (directory / "cgroup.procs").read_text().split()}
    return pids


def _rmdir(directory: Path, deadline: Deadline, what: str) -> None:
    """rmdir, retried briefly: the kernel frees a cgroup a moment after its last process is reaped."""
    while True:
        try:
            directory.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if deadline.expired():
                raise LabError(f"{what}: cannot remove {directory}: {exc}") from None
            time.sleep(_KILL_POLL_S)
