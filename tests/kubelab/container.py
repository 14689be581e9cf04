"""The container process: the runtime wrapper that starts a command in a pod's network namespace with a
private mount namespace, its own /tmp and only the capabilities asked for (``setpriv``); stopping it and what
it left behind; and exec readiness probes run in its namespaces."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_svctunnel import pids
from pytest_svctunnel.waiting import Deadline

from .errors import KubeletError, StartError
from .kubewatch import Obj, now

KILL_WAIT_S = 2.0  # how long a SIGKILLed process may take to vanish
START_TIMEOUT_S = 10.0  # from spawning the runtime wrapper to the container's exec
# The runtime wrapper: sh in the pod's network namespace and a fresh mount namespace (unshare), with "$0" the
# mount binary and "$@" setpriv plus the container's argv. Its stdin is the write end of a pipe: the line written
# there tells the kubelet that the container's namespaces and /tmp are final (probes may enter them); the
# container itself gets /dev/null.
# the container's private /tmp: an overlay on the host's /tmp (programs installed under /tmp, like a
# virtualenv, stay visible; what the container writes there stays its own), its upper layer on a
# tmpfs mounted over the container's scratch directory ($1)
_WRAPPER = (
    's="$1"; shift; "$0" -t tmpfs -o mode=0700 tmpfs "$s" && mkdir "$s/upper" "$s/work" && chmod 1777 "$s/upper"'
    ' && "$0" -t overlay overlay -o "lowerdir=/tmp,upperdir=$s/upper,workdir=$s/work" /tmp'
    ' && echo started >&0 && exec "$@" </dev/null'
)


def setpriv_args(caps: Sequence[str], no_new_privs: bool) -> list[str]:
    """setpriv's options for exactly the capabilities ``caps`` (bounding, inheritable, ambient)."""
    capset = ",".join(["-all", *(f"+{c}" for c in caps)])
    args = ["--bounding-set", capset, "--inh-caps", capset, "--ambient-caps", capset]
    return [*args, "--no-new-privs"] if no_new_privs else args


@dataclass(frozen=True)
class Tools:
    """Absolute paths of the programs the runtime wrapper uses, found once."""

    ip: str
    unshare: str
    setpriv: str
    nsenter: str
    mount: str
    sh: str

    @classmethod
    def find(cls) -> Tools:
        paths: dict[str, str] = {}
        for name in ("ip", "unshare", "setpriv", "nsenter", "mount", "sh"):
            found = shutil.which(name)
            if not found:
                raise KubeletError(f"{name} is not on PATH; the mini kubelet needs iproute2 and util-linux")
            paths[name] = found
        return cls(**paths)


def processes_in_mount_ns(identity: tuple[int, int] | None) -> list[pids.ProcessRef]:
    """Every process (but this one) in the mount namespace ``identity``: what is left of a container."""
    if identity is None:
        return []
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            ident = pids.netns_id(entry / "ns" / "mnt")  # (device, inode) of any namespace file
            if ident == identity and (ref := pids.ProcessRef.of(int(entry.name))):
                found.append(ref)
    return found


class ContainerProcess:
    """One run of a container: its process (a session leader) and its private mount namespace."""

    def __init__(self, popen: subprocess.Popen[bytes], mount_ns: tuple[int, int] | None) -> None:
        self.popen = popen
        self.mount_ns = mount_ns
        self.started_at = now()
        self.started_mono = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    @classmethod
    def launch(
        cls,
        tools: Tools,
        netns_name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        caps: Sequence[str],
        no_new_privs: bool,
        log_path: Path,
    ) -> ContainerProcess:
        """Start ``argv`` in ``netns_name`` behind the runtime wrapper; returns once the container's mount
        namespace and /tmp exist (the wrapper says so on a pipe), or raises StartError."""
        scratch = log_path.with_suffix(".scratch")
        scratch.mkdir(exist_ok=True)
        wrapper = [
            *(tools.ip, "netns", "exec", netns_name, tools.unshare, "--mount", "--propagation", "private"),
            *(tools.sh, "-c", _WRAPPER, tools.mount, str(scratch)),
            *(tools.setpriv, *setpriv_args(caps, no_new_privs), "--", *argv),
        ]
        started_r, started_w = os.pipe()
        try:
            with log_path.open("ab") as log_file:
                log_file.write(f"--- {now()} starting {list(argv)}\n".encode())
                log_file.flush()
                popen = subprocess.Popen(
                    wrapper, stdin=started_w, stdout=log_file, stderr=subprocess.STDOUT, env=dict(env),
                    start_new_session=True, close_fds=True,
                )  # fmt: skip
            os.close(started_w)
            started_w = -1
            ready, _, _ = select.select([started_r], [], [], START_TIMEOUT_S)
            started = bool(ready) and os.read(started_r, 16) != b""
        finally:
            os.close(started_r)
            if started_w >= 0:
                os.close(started_w)
        if not started:
            code = _stop_group(popen, 0.0)
            raise StartError(
                f"the runtime wrapper (ip netns exec {netns_name} unshare ... mount) "
                + (f"did not reach exec within {START_TIMEOUT_S:g} s" if code is None else f"exited with {code}")
                + f" before the container started; see {log_path}"
            )
        return cls(popen, pids.netns_id(Path(f"/proc/{popen.pid}/ns/mnt")))

    def poll(self) -> int | None:
        return self.popen.poll()

    def stop(self, grace: float) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace``, then kill whatever is left in the container's
        mount namespace (children that left the group). Returns the exit code (None if it would not die)."""
        code = _stop_group(self.popen, grace)
        pids.terminate(processes_in_mount_ns(self.mount_ns), Deadline.after(KILL_WAIT_S + 1.0), grace=0.5)
        return code


def _stop_group(popen: subprocess.Popen[bytes], grace: float) -> int | None:
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, KILL_WAIT_S)):
        if popen.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signum)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(wait)
    return popen.poll()  # once reaped, its pid may be anyone's: the rest goes by its mount namespace


def exit_code(returncode: int) -> int:
    """A container's exit code as Kubernetes reports it: 128 + the signal for a killed process."""
    return 128 - returncode if returncode < 0 else returncode


def run_exec_probe(tools: Tools, pid: int, command: Sequence[str], env: Mapping[str, str], timeout: float) -> str:
    """Run a probe command in the mount and network namespaces of ``pid``; '' on success, else why not."""
    try:
        done = subprocess.run(
            [tools.nsenter, "--target", str(pid), "--mount", "--net", "--", *command],
            env=dict(env), capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout:g} s"
    if done.returncode == 0:
        return ""
    output = (done.stdout + done.stderr).decode(errors="replace").strip()
    return f"exit code {done.returncode}" + (f": {output[-200:]}" if output else "")


@dataclass
class ReadinessProbe:
    """An exec readinessProbe and its counters (Kubernetes defaults for what the spec leaves out)."""

    command: list[str]
    initial_delay: float = 0.0
    period: float = 10.0
    timeout: float = 1.0
    success_threshold: int = 1
    failure_threshold: int = 3
    next_at: float = 0.0
    successes: int = 0
    failures: int = 0

    @classmethod
    def from_spec(cls, spec: Obj | None) -> ReadinessProbe | None:
        """None without a probe; an error for kinds other than exec (only exec runs here)."""
        if not spec:
            return None
        command = (spec.get("exec") or {}).get("command")
        if not command:
            kinds: list[str] = [kind for kind in ("httpGet", "tcpSocket", "grpc") if kind in spec] or [
                "one without exec"
            ]
            raise KubeletError(f"only exec readiness probes run on the mini kubelet, not {', '.join(kinds)}")
        return cls(
            [str(c) for c in command],
            float(spec.get("initialDelaySeconds") or 0),
            float(spec.get("periodSeconds") or 10),
            float(spec.get("timeoutSeconds") or 1),
            int(spec.get("successThreshold") or 1),
            int(spec.get("failureThreshold") or 3),
        )

    def restart(self) -> None:
        self.next_at = time.monotonic() + self.initial_delay
        self.successes = self.failures = 0

    def due(self) -> bool:
        return time.monotonic() >= self.next_at

    def record(self, ok: bool, ready: bool) -> bool:
        """Count one result; returns whether the container is ready now."""
        self.next_at = time.monotonic() + self.period
        self.successes, self.failures = (self.successes + 1, 0) if ok else (0, self.failures + 1)
        if ok and self.successes >= self.success_threshold:
            return True
        if not ok and self.failures >= self.failure_threshold:
            return False
        return ready
