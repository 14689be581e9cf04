"""A minimal kubelet and scheduler for one node of the test control plane, as threads in the test process.

``MiniKubelet`` binds pending pods that fit its node (nodeSelector, required node affinity, taints) and runs the
pods bound to it as plain processes:

- network: a pod gets the network namespace ``<pod_prefix><n>``, wired to the node namespace by a veth pair
  (``p<n>`` there, ``eth0`` inside) with a /30 and a /64 carved from the node's pod CIDRs (node side the first
  host, pod the second) and default routes through the node side; a ``hostNetwork`` pod runs in the node
  namespace with the node's InternalIPs;
- container: the first container runs in that namespace, in a private mount namespace with its own /tmp, with
  only the capabilities of ``securityContext.capabilities.add`` (all for ``privileged``) and no-new-privs when
  ``allowPrivilegeEscalation`` is false; stdout and stderr go to a log file per pod under ``work_dir``;
- images: there are none. A pod whose image is not in ``images`` waits in ErrImagePull, then ImagePullBackOff,
  and never starts. Kubernetes runs ``command`` (else the image's ENTRYPOINT) with ``args`` (else the image's
  CMD): here ``command`` + ``args`` run as given, and without ``command`` the entry point comes from
  ``entrypoints`` (image -> argv); an image without one runs ``args`` alone, as an image with only a CMD would.
  Executables resolve through PATH, which starts with ``path`` (default: this Python's bin directory, where the
  ``svctunnel`` script lives);
- status: phase, host and pod IPs, conditions and the container's status, readiness from an ``exec``
  readinessProbe (run in the container's mount and network namespaces), restarts with a short backoff and
  CrashLoopBackOff after three quick exits;
- deletion: SIGTERM to the container, SIGKILL after its grace period (at most 10 s), the namespace and link
  removed, then the pod deleted for good; a pod that vanishes (force-deleted, namespace gone) is stopped too;
- the node: its Lease is renewed and its Ready condition posted, so the node lifecycle controller keeps it Ready.

Not done: images, volumes, init and further containers, liveness and startup probes, resources, pid namespaces,
DNS. The watch helper ``ObjectWatch`` is shared with the load-balancer controller.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from pytest_svctunnel import device, netns, pids
from pytest_svctunnel.errors import LabError, SvcTunnelError
from pytest_svctunnel.lab import NO_DAD
from pytest_svctunnel.waiting import Deadline

log = logging.getLogger(__name__)

Obj = dict[str, Any]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface

API_TIMEOUT_S = 15.0  # one API request
WATCH_WINDOW_S = 5  # server-side length of one watch request: how often resyncs run
RETRY_S = 1.0  # after a failed list or watch
TICK_S = 0.1  # how often a pod's process is polled
MAX_GRACE_S = 10.0  # cap on a pod's termination grace period
STOP_GRACE_S = 2.0  # grace of the containers when the kubelet itself stops
KILL_WAIT_S = 2.0  # how long a SIGKILLed process may take to vanish
START_TIMEOUT_S = 10.0  # from spawning the runtime wrapper to the container's exec
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 5.0  # restart backoff doubles from the first to the max
QUICK_EXIT_S = 10.0  # an exit this soon after the start counts towards a crash loop
CRASH_LOOP_AFTER = 3  # quick exits in a row before the status says CrashLoopBackOff
IMAGE_BACKOFF_S = 1.0  # ErrImagePull turns into ImagePullBackOff after this
CONFIG_RETRY_S = 1.0  # a container whose env cannot be resolved (missing Secret) retries after this
LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40
LEASE_RENEW_S = 10.0
NODE_STATUS_S = 60.0  # the Ready condition is re-posted this often; the Lease is the heartbeat
POD_PREFIXLEN = {4: 30, 6: 64}
CONDITION_TAINTS = ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_GRACE_S = 30
ACTIVE_PHASES = ("Pending", "Running", "Unknown")
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


class KubeletError(LabError):
    """The mini kubelet could not start, run a pod, or stop."""


class ContainerConfigError(KubeletError):
    """A container's environment cannot be resolved yet (a missing Secret or key)."""


class StartError(KubeletError):
    """A container process could not be started."""


# -- time and the API -----------------------------------------------------------------------------------------


def now() -> str:
    """The current time as Kubernetes writes it (RFC 3339, seconds)."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def read_json(response: Any) -> Obj:
    """The body of a raw (``_preload_content=False``) response, which is released."""
    try:
        return dict(json.loads(response.data))
    finally:
        response.release_conn()


def _drain(response: Any) -> None:
    with contextlib.suppress(Exception):
        response.read()
    response.release_conn()


def key_of(obj: Obj) -> str:
    meta = obj.get("metadata", {})
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def _lines(response: Any) -> Iterator[bytes]:
    """The newline-separated events of a watch response, as they arrive."""
    buffer = b""
    for chunk in response.stream(amt=None, decode_content=False):
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line.strip():
                yield line


class ObjectWatch:
    """A cache of one kind of object in all namespaces (raw dicts by uid), kept by list and watch in a thread.

    ``on_change(old, new)`` runs in that thread for every object that appears (old None), changes, or goes (new
    None), including the differences a relist finds. ``on_resync()`` runs after the first list and after every
    watch window (``WATCH_WINDOW_S``), for retries. An expired watch (410 Gone) and errors lead to a relist.
    """

    def __init__(
        self,
        kind: str,
        list_all: Callable[..., Any],
        on_change: Callable[[Obj | None, Obj | None], None],
        on_resync: Callable[[], None] = lambda: None,
    ) -> None:
        self.kind = kind
        self.cache: dict[str, Obj] = {}
        self.synced = threading.Event()
        self._list_all = list_all
        self._on_change = on_change
        self._on_resync = on_resync
        self._stopping = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to end; a watch request in flight is cut at once."""
        self._stopping.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the thread; True once it has ended (or never started)."""
        if self._thread.ident is not None:
            self._thread.join(max(timeout, 0.0))
        return not self._thread.is_alive()

    def _run(self) -> None:
        version: str | None = None
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._relist()
                    self.synced.set()
                    self._on_resync()
                version = self._watch(version)
                self._on_resync()
            except ApiException as exc:
                version = None
                if exc.status == 410:
                    log.info("%s: watch expired (410 Gone); relisting", self.kind)
                elif not self._stopping.is_set():
                    log.warning("%s: API error %s %s; relisting in %g s", self.kind, exc.status, exc.reason, RETRY_S)
                    self._stopping.wait(RETRY_S)
            except Exception as exc:  # the loop outlives API server restarts and its own callbacks' bugs
                version = None
                if not self._stopping.is_set():
                    log.warning("%s: list/watch failed: %r; relisting in %g s", self.kind, exc, RETRY_S, exc_info=True)
                    self._stopping.wait(RETRY_S)

    def _relist(self) -> str:
        listing = read_json(self._list_all(_preload_content=False, _request_timeout=API_TIMEOUT_S))
        fresh = {str(o["metadata"]["uid"]): o for o in listing.get("items") or []}
        for uid in set(self.cache) - set(fresh):
            self._change(uid, None)
        for uid, obj in fresh.items():
            self._change(uid, obj)
        return str(listing["metadata"]["resourceVersion"])

    def _watch(self, version: str) -> str:
        response = self._list_all(
            watch=True,
            resource_version=version,
            allow_watch_bookmarks=True,
            timeout_seconds=WATCH_WINDOW_S,
            _preload_content=False,
            _request_timeout=(API_TIMEOUT_S, WATCH_WINDOW_S + API_TIMEOUT_S),
        )
        self._response = response
        try:
            if self._stopping.is_set():
                return version
            for line in _lines(response):
                version = self._event(json.loads(line), version)
                if self._stopping.is_set():
                    break
        finally:
            self._response = None
            with contextlib.suppress(Exception):
                response.release_conn()
        return version

    def _event(self, event: Obj, version: str) -> str:
        kind, obj = event.get("type"), event.get("object") or {}
        if kind == "ERROR":
            raise ApiException(status=obj.get("code"), reason=f"{obj.get('reason')}: {obj.get('message')}")
        version = str(obj.get("metadata", {}).get("resourceVersion") or version)
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._change(str(obj["metadata"]["uid"]), None if kind == "DELETED" else obj)
        return version

    def _change(self, uid: str, obj: Obj | None) -> None:
        old = self.cache.pop(uid, None) if obj is None else self.cache.get(uid)
        if obj is not None:
            self.cache[uid] = obj
        if old is not None or obj is not None:
            try:
                self._on_change(old, obj)
            except Exception:  # one object's trouble must not stop the others; resyncs retry
                log.exception("%s: handling %s failed", self.kind, key_of(obj or old or {}))


# -- scheduling (pure) ----------------------------------------------------------------------------------------


def _tolerates(toleration: Obj, taint: Obj) -> bool:
    if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
        return False
    operator = toleration.get("operator") or "Equal"
    if not toleration.get("key"):
        return operator == "Exists"  # an empty key with Exists tolerates every taint
    if toleration["key"] != taint.get("key"):
        return False
    return operator == "Exists" or (toleration.get("value") or "") == (taint.get("value") or "")


def _requirement_holds(requirement: Obj, values: Mapping[str, str]) -> bool:
    key, operator, wanted = requirement.get("key", ""), requirement.get("operator"), requirement.get("values") or []
    if operator == "In":
        return key in values and values[key] in wanted
    if operator == "NotIn":
        return key not in values or values[key] not in wanted
    if operator == "Exists":
        return key in values
    if operator == "DoesNotExist":
        return key not in values
    if operator in ("Gt", "Lt") and key in values and len(wanted) == 1:
        with contextlib.suppress(ValueError):
            have, limit = int(values[key]), int(wanted[0])
            return have > limit if operator == "Gt" else have < limit
    return False


def _affinity_holds(pod: Obj, node: Obj) -> bool:
    """The pod's requiredDuringScheduling node affinity: terms are ORed, their requirements ANDed."""
    affinity = ((pod["spec"].get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    )
    if not affinity:
        return True
    labels = node["metadata"].get("labels") or {}
    fields = {"metadata.name": node["metadata"]["name"]}
    return any(
        all(_requirement_holds(r, labels) for r in term.get("matchExpressions") or [])
        and all(_requirement_holds(r, fields) for r in term.get("matchFields") or [])
        for term in affinity.get("nodeSelectorTerms") or []
    )


def unschedulable_reason(pod: Obj, node: Obj) -> str | None:
    """Why ``pod`` cannot run on ``node``, in the scheduler's words, or None if it fits."""
    labels = node["metadata"].get("labels") or {}
    selector = pod["spec"].get("nodeSelector") or {}
    if any(labels.get(k) != v for k, v in selector.items()) or not _affinity_holds(pod, node):
        return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
    if (node.get("spec") or {}).get("unschedulable"):
        return "0/1 nodes are available: 1 node(s) were unschedulable."
    tolerations = pod["spec"].get("tolerations") or []
    for taint in (node.get("spec") or {}).get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(_tolerates(t, taint) for t in tolerations):
            return (
                "0/1 nodes are available: 1 node(s) had untolerated taint "
                f"{{{taint.get('key')}: {taint.get('value') or ''}}}."
            )
    return None


def internal_ips(node: Obj) -> list[str]:
    """The node's InternalIP addresses, IPv4 first."""
    found = [a["address"] for a in (node.get("status") or {}).get("addresses") or [] if a.get("type") == "InternalIP"]
    return sorted(found, key=lambda a: ipaddress.ip_address(a).version)


# -- containers (pure) ----------------------------------------------------------------------------------------

_REFERENCE = re.compile(r"\$\$|\$\(([^)]*)\)")
_FIELD_INDEX = re.compile(r"metadata\.(labels|annotations)\['(.+)'\]")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: known variables are replaced, unknown ones kept, ``$$`` is ``$``."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, text)


def container_command(container: Obj, entrypoint: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """The argv of a container: ``command`` (else the image's entry point) followed by ``args``."""
    command = container.get("command") or list(entrypoint)
    argv = [expand(str(a), env) for a in [*command, *(container.get("args") or [])]]
    if not argv:
        raise StartError(
            f"container {container.get('name')} has neither command nor args, and image {container.get('image')} "
            "has no entry point here: set command in the pod spec, or pass entrypoints= to MiniKubelet"
        )
    return argv


def resolve_executable(name: str, search_path: str) -> str:
    """What ``execvp`` would run for ``name``, or StartError in Kubernetes' words."""
    found = name if "/" in name and os.access(name, os.X_OK) else shutil.which(name, path=search_path)
    if not found:
        raise StartError(f'exec: "{name}": executable file not found in $PATH ({search_path})')
    return found


def capabilities(container: Obj) -> list[str]:
    """The capabilities a container gets, as setpriv names them: ``add`` only (no runtime defaults)."""
    context = container.get("securityContext") or {}
    if context.get("privileged"):
        return ["all"]
    added = (context.get("capabilities") or {}).get("add") or []
    return sorted({str(c).lower().removeprefix("cap_") for c in added})


def setpriv_args(caps: Sequence[str], no_new_privs: bool) -> list[str]:
    capset = ",".join(["-all", *(f"+{c}" for c in caps)])
    args = ["--bounding-set", capset, "--inh-caps", capset, "--ambient-caps", capset]
    return [*args, "--no-new-privs"] if no_new_privs else args


def _full_state(state: Obj) -> Obj:
    """A container state with the other two kinds set to null, so a strategic merge patch removes them."""
    return {kind: state.get(kind) for kind in ("waiting", "running", "terminated")}


def describe_state(state: Obj) -> str:
    if "running" in state:
        return "running"
    if "terminated" in state:
        t = state["terminated"]
        return f"terminated ({t.get('reason')}, exit code {t.get('exitCode')})"
    w = state.get("waiting") or {}
    return f"waiting ({w.get('reason')}{': ' + w['message'] if w.get('message') else ''})"


# -- tools and processes ----------------------------------------------------------------------------------------


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


# -- the pod network (the node's "CNI") -------------------------------------------------------------------------


@dataclass(frozen=True)
class Sandbox:
    """Where a pod's container runs: a network namespace, the pod's addresses (IPv4 first) and, for a pod
    namespace of its own, the slot and the node-side link (None for hostNetwork)."""

    netns: str
    ips: tuple[str, ...]
    slot: int | None = None
    link: str | None = None


def slot_subnet(cidr: IPNetwork, prefixlen: int, slot: int) -> IPNetwork:
    """The ``slot``-th subnet of length ``prefixlen`` in ``cidr``."""
    if prefixlen < cidr.prefixlen or slot >= 1 << (prefixlen - cidr.prefixlen):
        raise KubeletError(f"pod CIDR {cidr} has no /{prefixlen} number {slot}; give the node a larger pod CIDR")
    size = 1 << (cidr.max_prefixlen - prefixlen)
    return ipaddress.ip_network(f"{cidr.network_address + slot * size}/{prefixlen}")


class PodNetwork:
    """Wires pod namespaces to the node namespace: slot n is namespace ``<prefix>n`` with ``eth0``, the node's
    ``p<n>``, and subnet n of each pod CIDR. Slot 0 is never used, so no pod gets a CIDR's network address."""

    def __init__(self, node_netns: str, pod_prefix: str, cidrs: Sequence[IPNetwork]) -> None:
        self.node_netns = node_netns
        self.pod_prefix = pod_prefix
        self.cidrs = sorted(cidrs, key=lambda c: c.version)
        self.capacity = min((1 << (POD_PREFIXLEN[c.version] - c.prefixlen)) - 1 for c in self.cidrs)
        if self.capacity < 1:
            raise KubeletError(f"pod CIDRs {[str(c) for c in self.cidrs]} hold no /30 or /64 per pod besides the first")
        self._names = re.compile(re.escape(pod_prefix) + r"(\d+)$")

    def names(self, slot: int) -> tuple[str, str]:
        return f"{self.pod_prefix}{slot}", f"p{slot}"

    def interfaces(self, slot: int) -> list[tuple[IPInterface, IPInterface]]:
        """(node side, pod side) per address family, IPv4 first."""
        pairs = []
        for cidr in self.cidrs:
            subnet = slot_subnet(cidr, POD_PREFIXLEN[cidr.version], slot)
            pairs.append(
                (
                    ipaddress.ip_interface(f"{subnet.network_address + 1}/{subnet.prefixlen}"),
                    ipaddress.ip_interface(f"{subnet.network_address + 2}/{subnet.prefixlen}"),
                )
            )
        return pairs

    def create(self, slot: int) -> Sandbox:
        """Build slot ``slot`` (replacing leftovers of an earlier one); on failure nothing of it is left."""
        name, link = self.names(slot)
        pairs = self.interfaces(slot)
        with ExitStack() as undo:
            self.remove(name, link)
            netns.create(name)
            undo.callback(self.remove, name, link)
            netns.sysctl(name, NO_DAD)
            with device.netlink(self.node_netns) as ipr:
                ipr.link("add", ifname=link, kind="veth", peer={"ifname": "eth0", "net_ns_fd": name})
            netns.sysctl(self.node_netns, {f"net.ipv6.conf.{link}.accept_dad": "0"})
            _configure(self.node_netns, link, [node for node, _ in pairs])
            _configure(name, "eth0", [pod for _, pod in pairs])
            with device.netlink(name) as ipr:
                for node_side, _ in pairs:
                    ipr.route("add", dst="0.0.0.0/0" if node_side.version == 4 else "::/0", gateway=str(node_side.ip))
            undo.pop_all()
        return Sandbox(name, tuple(str(pod.ip) for _, pod in pairs), slot, link)

    def remove(self, name: str, link: str | None) -> None:
        """Stop what runs in the namespace, remove it and the node-side link; gone already is fine."""
        identity = pids.netns_id(Path("/run/netns") / name)
        if identity is not None:
            stuck = pids.terminate(pids.in_netns({identity}), Deadline.after(KILL_WAIT_S + 1.0), grace=0.5)
            if stuck:
                log.warning("processes %s in %s survived SIGKILL", [p.pid for p in stuck], name)
        netns.remove(name)
        if link:
            device.delete_link(self.node_netns, link)

    def leftovers(self) -> list[tuple[str, str]]:
        """(namespace, link) of every slot that exists on this host, whoever made it."""
        slots = {int(m.group(1)) for n in netns.listing(self.pod_prefix) if (m := self._names.match(n))}
        with contextlib.suppress(SvcTunnelError):  # no node namespace: no links either
            slots |= {int(n[1:]) for n in device.links_with_prefix(self.node_netns, "p") if n[1:].isdigit()}
        return [self.names(s) for s in sorted(slots)]


def _configure(netns_name: str, ifname: str, addresses: Sequence[IPInterface]) -> None:
    with device.netlink(netns_name) as ipr:
        index = ipr.link_lookup(ifname=ifname)[0]
        for address in addresses:
            flags = device.IFA_F_NODAD if address.version == 6 else 0
            ipr.addr("add", index=index, address=str(address.ip), prefixlen=address.network.prefixlen, flags=flags)
        ipr.link("set", index=index, state="up")
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


# -- one pod ---------------------------------------------------------------------------------------------------


class PodWorker:
    """Runs one pod bound to this node, in a thread of its own: sandbox, container, probes, restarts, status,
    and on stop the container's end, the sandbox's removal and (for a deleted pod) the pod's final deletion."""

    def __init__(self, kubelet: MiniKubelet, pod: Obj) -> None:
        self.kubelet = kubelet
        self.pod = pod
        meta, spec = pod["metadata"], pod["spec"]
        self.uid, self.namespace, self.name = str(meta["uid"]), str(meta["namespace"]), str(meta["name"])
        self.key = f"{self.namespace}/{self.name}"
        self.container: Obj = spec["containers"][0]
        self.host_network = bool(spec.get("hostNetwork"))
        self.restart_policy = str(spec.get("restartPolicy") or "Always")
        self.log_path = kubelet.work_dir / f"{self.namespace}_{self.name}_{self.uid[:8]}.log"
        self.sandbox: Sandbox | None = None
        self.sandbox_removed = False  # a finished pod's sandbox goes at once; its IPs stay in the status
        self.process: ContainerProcess | None = None
        self.phase = "Pending"
        self.state: Obj = {"waiting": {"reason": "ContainerCreating"}}
        self.last_exit: Obj | None = None  # the latest terminated state
        self.previous_exit: Obj | None = None  # the one before it
        self.attempts = 0
        self.quick_exits = 0
        self.next_start = 0.0
        self.ready = False
        self.start_time = now()
        self.created = time.monotonic()
        self.config_error = ""  # what keeps the container from ever starting
        try:
            self.probe = ReadinessProbe.from_spec(self.container.get("readinessProbe"))
        except KubeletError as exc:
            self.probe, self.config_error = None, str(exc)
        self.env: dict[str, str] = {}
        self._stopping = threading.Event()
        self._grace = MAX_GRACE_S
        self._delete = False
        self._conditions: dict[str, tuple[str, str]] = {}
        self._published: Obj | None = None
        self._said = ""
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.key}", daemon=True)
        if len(spec["containers"]) > 1 or spec.get("initContainers"):
            log.warning("pod %s: only its first container (%s) runs here", self.key, self.container.get("name"))

    # called from the kubelet's threads

    def update(self, pod: Obj) -> None:
        self.pod = pod
        meta = pod["metadata"]
        if meta.get("deletionTimestamp") and not self._stopping.is_set():
            grace = meta.get("deletionGracePeriodSeconds")
            grace = pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_S) if grace is None else grace
            log.info("pod %s: deleted; stopping it (grace %s s, at most %g s)", self.key, grace, MAX_GRACE_S)
            self.stop(float(grace), delete=True)

    def stop(self, grace: float, delete: bool) -> None:
        """Ask the worker to end the pod; ``delete``: then delete the pod object for good. The first request
        wins: a pod deleted through the API and then gone from it is still deleted (a 404 then)."""
        if self._stopping.is_set():
            return
        self._grace = min(max(grace, 0.0), MAX_GRACE_S)
        self._delete = delete
        self._stopping.set()

    def summary(self) -> str:
        pid = self.process.pid if self.process else "-"
        ips = ",".join(self.sandbox.ips) if self.sandbox else "-"
        return (
            f"{self.key} ({self.uid[:8]}): {self.phase}, {describe_state(self.state)}, ready={self.ready}, "
            f"restarts={max(self.attempts - 1, 0)}, ips={ips}, pid={pid}, log={self.log_path}"
        )

    # the worker thread

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._step()
                self._publish()
                self._stopping.wait(TICK_S)
        except Exception:
            log.exception("pod %s: worker failed; stopping the pod", self.key)
        finally:
            self._finish()

    def _step(self) -> None:
        if self.sandbox is None and not self._make_sandbox():
            return
        if self.phase in ("Succeeded", "Failed"):
            self._remove_sandbox()
            return
        image = str(self.container.get("image"))
        if self.config_error:
            self._set_state({"waiting": {"reason": "CreateContainerConfigError", "message": self.config_error}})
        elif image not in self.kubelet.images:
            reason = "ErrImagePull" if time.monotonic() - self.created < IMAGE_BACKOFF_S else "ImagePullBackOff"
            message = f'image "{image}" is not in the mini kubelet\'s images ({", ".join(sorted(self.kubelet.images))})'
            self._set_state({"waiting": {"reason": reason, "message": message}})
        elif self.process is None:
            if time.monotonic() >= self.next_start:
                self._start()
        elif (code := self.process.poll()) is not None:
            self.process.stop(0.0)  # what the container left behind goes with it
            self._exited(exit_code(code))
        elif self.probe is not None and self.probe.due():
            self._probe()

    def _make_sandbox(self) -> bool:
        try:
            self.sandbox = self.kubelet.make_sandbox(self)
        except Exception as exc:  # kernel or netlink trouble: nothing of it is left (create undoes), so retry
            log.warning("pod %s: creating its sandbox failed: %r; retrying in %g s", self.key, exc, RETRY_S)
            self._stopping.wait(RETRY_S)
            return False
        log.info("pod %s: sandbox %s, ips %s", self.key, self.sandbox.netns, ", ".join(self.sandbox.ips))
        return True

    def _start(self) -> None:
        assert self.sandbox is not None
        try:
            self.env = self.kubelet.container_env(self, self.sandbox)
            argv = container_command(
                self.container, self.kubelet.entrypoints.get(self.container["image"], ()), self.env
            )
            resolve_executable(argv[0], self.env.get("PATH", DEFAULT_PATH))
        except ContainerConfigError as exc:
            self._set_state({"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}})
            self.next_start = time.monotonic() + CONFIG_RETRY_S
            return
        except StartError as exc:
            self.attempts += 1
            self._exited(128, "StartError", str(exc), started_at=now())
            return
        self.attempts += 1
        context = self.container.get("securityContext") or {}
        try:
            self.process = ContainerProcess.launch(
                self.kubelet.tools, self.sandbox.netns, argv, self.env, capabilities(self.container),
                context.get("allowPrivilegeEscalation") is False, self.log_path,
            )  # fmt: skip
        except StartError as exc:
            self._exited(128, "StartError", str(exc), started_at=now())
            return
        self.phase = "Running"
        self.ready = self.probe is None
        if self.probe is not None:
            self.probe.restart()
        self._set_state({"running": {"startedAt": self.process.started_at}}, f"pid {self.process.pid}, {argv}")

    def _exited(self, code: int, reason: str | None = None, message: str = "", started_at: str | None = None) -> None:
        ran = time.monotonic() - self.process.started_mono if self.process else 0.0
        terminated: Obj = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": started_at or (self.process.started_at if self.process else now()),
            "finishedAt": now(),
        }
        if message:
            terminated["message"] = message
        self.process = None
        self.ready = False
        self.previous_exit, self.last_exit = self.last_exit, terminated
        if not (self.restart_policy == "Always" or (self.restart_policy == "OnFailure" and code != 0)):
            self.phase = "Succeeded" if code == 0 else "Failed"
            self._set_state({"terminated": terminated})
            return
        self.quick_exits = self.quick_exits + 1 if ran < QUICK_EXIT_S else 1
        delay = min(BACKOFF_FIRST_S * 2 ** (self.quick_exits - 1), BACKOFF_MAX_S)
        self.next_start = time.monotonic() + delay
        if self.quick_exits >= CRASH_LOOP_AFTER:
            back_off = f"back-off {delay:g}s restarting failed container={self.container['name']} pod={self.key}"
            self._set_state({"waiting": {"reason": "CrashLoopBackOff", "message": back_off}})
        else:
            self._set_state({"terminated": terminated})

    def _probe(self) -> None:
        assert self.probe is not None and self.process is not None
        failure = run_exec_probe(self.kubelet.tools, self.process.pid, self.probe.command, self.env, self.probe.timeout)
        ready = self.probe.record(not failure, self.ready)
        if ready != self.ready:
            log.info("pod %s: %s", self.key, "ready" if ready else f"not ready (readiness probe: {failure})")
        self.ready = ready

    def _set_state(self, state: Obj, detail: str = "") -> None:
        self.state = state
        said = describe_state(state)
        if said != self._said:
            restarts = f", restarts {self.attempts - 1}" if self.attempts > 1 else ""
            log.info("pod %s: %s%s%s", self.key, said, f" ({detail})" if detail else "", restarts)
            self._said = said

    # status

    def _publish(self) -> None:
        body = self._status()
        if body == self._published:
            return
        try:
            _drain(
                self.kubelet.core.patch_namespaced_pod_status(
                    self.name, self.namespace, body, _preload_content=False, _request_timeout=API_TIMEOUT_S
                )
            )
        except ApiException as exc:
            if exc.status != 404:  # gone: the watch says so and stops this worker
                log.warning("pod %s: status update failed: %s %s; retrying", self.key, exc.status, exc.reason)
                self._stopping.wait(RETRY_S)
            return
        self._published = body

    def _status(self) -> Obj:
        host_ips = self.kubelet.host_ips
        pod_ips = list(self.sandbox.ips) if self.sandbox else []
        return {
            "status": {
                "phase": self.phase,
                "hostIP": host_ips[0],
                "hostIPs": [{"ip": ip} for ip in host_ips],
                "podIP": pod_ips[0] if pod_ips else None,
                "podIPs": [{"ip": ip} for ip in pod_ips] or None,
                "startTime": self.start_time,
                "conditions": self._condition_list(),
                "containerStatuses": [self._container_status()],
            }
        }

    def _condition_list(self) -> list[Obj]:
        done = self.phase in ("Succeeded", "Failed")
        wanted = {
            "PodScheduled": True,
            "PodReadyToStartContainers": self.sandbox is not None and not done,
            "Initialized": True,
            "ContainersReady": self.ready,
            "Ready": self.ready,
        }
        conditions = []
        for kind, holds in wanted.items():
            status = "True" if holds else "False"
            if self._conditions.get(kind, ("", ""))[0] != status:
                self._conditions[kind] = (status, now())
            condition: Obj = {"type": kind, "status": status, "lastTransitionTime": self._conditions[kind][1]}
            unready = kind in ("ContainersReady", "Ready") and not holds
            condition["reason"] = ("PodCompleted" if done else "ContainersNotReady") if unready else None
            condition["message"] = f"containers with unready status: [{self.container['name']}]" if unready else None
            conditions.append(condition)
        return conditions

    def _container_status(self) -> Obj:
        last = self.previous_exit if "terminated" in self.state else self.last_exit
        return {
            "name": self.container["name"],
            "image": self.container.get("image"),
            "imageID": "",
            "containerID": f"mini://{self.uid}/{self.attempts}" if self.attempts else None,
            "ready": self.ready,
            "restartCount": max(self.attempts - 1, 0),
            "started": "running" in self.state,
            "state": _full_state(self.state),
            "lastState": _full_state({"terminated": last}) if last else {},
        }

    # the end

    def _remove_sandbox(self) -> None:
        """Remove the sandbox once: its slot may belong to another pod afterwards."""
        if self.sandbox is not None and not self.sandbox_removed:
            self.kubelet.remove_sandbox(self.sandbox)
            self.sandbox_removed = True

    def _finish(self) -> None:
        try:
            if self.process is not None:
                code = self.process.stop(self._grace)
                log.info("pod %s: container stopped (exit code %s)", self.key, "?" if code is None else exit_code(code))
                self.process = None
            self._remove_sandbox()
            if self._delete:
                self.kubelet.delete_pod(self.pod)
        except Exception:
            log.exception("pod %s: cleanup failed; MiniKubelet.stop removes what is left", self.key)
        finally:
            self.kubelet.forget(self)


# -- the kubelet -------------------------------------------------------------------------------------------------


class MiniKubelet:
    """A kubelet and scheduler for the one node ``node_name`` of a test control plane, as threads in this
    process; see the module's docstring for what it does. ``start()`` returns once it has listed the pods;
    ``stop()`` kills every container and removes every pod namespace it made (safe twice).

    ``pod_prefix`` names the pods' network namespaces (``<pod_prefix><n>``); it should start with the run's
    ``svt-<id>-`` so the run's cleanup finds them. ``path``: directories put before the default PATH of every
    container (default: this Python's bin directory). ``entrypoints``: an image's entry point, used when a
    container has no ``command``. ``heartbeat``: renew the node's Lease and post its Ready condition.
    """

    def __init__(
        self,
        api: kubernetes.client.ApiClient,
        node_name: str,
        node_netns: str,
        pod_prefix: str,
        pod_cidr_v4: ipaddress.IPv4Network,
        pod_cidr_v6: ipaddress.IPv6Network | None,
        work_dir: Path,
        images: Iterable[str],
        *,
        path: Sequence[Path | str] = (Path(sys.executable).parent,),
        entrypoints: Mapping[str, Sequence[str]] | None = None,
        heartbeat: bool = True,
    ) -> None:
        if not pod_prefix.startswith("svt-"):
            raise KubeletError(f"pod namespace prefix {pod_prefix!r} must start with the run's 'svt-<id>-'")
        self.core = kubernetes.client.CoreV1Api(api)
        self.coordination = kubernetes.client.CoordinationV1Api(api)
        self.node_name = node_name
        self.node_netns = node_netns
        self.work_dir = Path(work_dir)
        self.images = frozenset(images)
        self.entrypoints = {image: list(argv) for image, argv in (entrypoints or {}).items()}
        self.container_path = ":".join([*(str(p) for p in path), DEFAULT_PATH])
        self.heartbeat = heartbeat
        cidrs: list[IPNetwork] = [pod_cidr_v4] if pod_cidr_v6 is None else [pod_cidr_v4, pod_cidr_v6]
        self.network = PodNetwork(node_netns, pod_prefix, cidrs)
        self.tools = Tools.find()
        self.host_ips: list[str] = []
        self._node_uid = ""
        self._lock = threading.Lock()
        self._workers: dict[str, PodWorker] = {}
        self._finished: set[str] = set()  # uids whose worker ended: never run again
        self._slots: set[int] = set()
        self._stopping = threading.Event()
        self._pods = ObjectWatch("pods", self.core.list_pod_for_all_namespaces, self._on_pod, self._resync)
        self._beat = threading.Thread(target=self._heartbeat_loop, name=f"heartbeat-{node_name}", daemon=True)
        self._started = False

    # lifecycle

    def start(self, timeout: float = 30.0) -> None:
        """Read the node, remove leftovers of an earlier kubelet with the same prefix, post the node Ready,
        and start watching pods; returns once the first pod list is in."""
        deadline = Deadline.after(timeout)
        node = self._read_node()
        self._node_uid = str(node["metadata"]["uid"])
        self.host_ips = internal_ips(node)
        if not self.host_ips:
            raise KubeletError(f"node {self.node_name} has no InternalIP address; create it with one")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        self._started = True
        if self.heartbeat:
            self._post_ready()
            self._clear_condition_taints()
            self._renew_lease()
            self._beat.start()
        self._pods.start()
        if not self._pods.synced.wait(deadline.remaining()):
            raise KubeletError(
                f"mini kubelet of {self.node_name}: no pod list after {timeout:g} s; is the API server up? "
                "(the log shows the list errors)"
            )
        log.info("mini kubelet of node %s started (host IPs %s)", self.node_name, ", ".join(self.host_ips))

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every container (SIGTERM, SIGKILL after STOP_GRACE_S), remove every pod namespace and link, end
        the threads. Pods stay in the API as they were. Raises KubeletError naming what would not stop."""
        deadline = Deadline.after(timeout)
        with self._lock:
            self._stopping.set()
            workers = list(self._workers.values())
        self._pods.stop()
        for worker in workers:
            worker.stop(STOP_GRACE_S, delete=False)
        stuck = [w.key for w in workers if not _join(w.thread, deadline)]
        if not self._pods.join(deadline.remaining()):
            stuck.append("pod watch")
        if self._beat.ident is not None and not _join(self._beat, deadline):
            stuck.append("heartbeat")
        self._remove_leftovers()
        if stuck:
            raise KubeletError(
                f"mini kubelet of {self.node_name}: {', '.join(stuck)} did not stop within {timeout:g} s"
            )
        if self._started:
            log.info("mini kubelet of node %s stopped", self.node_name)
            self._started = False

    def describe(self) -> str:
        """One line per pod this kubelet runs, for diagnostics."""
        with self._lock:
            workers = list(self._workers.values())
        return "\n".join(w.summary() for w in workers) or "(no pods)"

    def log_path(self, namespace: str, name: str) -> Path | None:
        """The log file of the pod's container, while this kubelet runs the pod."""
        worker = self._worker(namespace, name)
        return worker.log_path if worker else None

    def container_pid(self, namespace: str, name: str) -> int | None:
        """The pid of the pod's running container process, if any."""
        worker = self._worker(namespace, name)
        process = worker.process if worker else None
        return process.pid if process else None

    def _worker(self, namespace: str, name: str) -> PodWorker | None:
        with self._lock:
            found = [w for w in self._workers.values() if (w.namespace, w.name) == (namespace, name)]
        return found[0] if found else None

    # pods: the watch thread

    def _on_pod(self, old: Obj | None, pod: Obj | None) -> None:
        if pod is None:
            assert old is not None
            self._vanished(old)
            return
        node = pod["spec"].get("nodeName")
        if not node:
            self._schedule(pod, None)
            return
        if node != self.node_name or self._stopping.is_set():
            return
        uid = str(pod["metadata"]["uid"])
        with self._lock:
            worker = self._workers.get(uid)
            finished = uid in self._finished
        if worker is not None:
            worker.update(pod)
        elif pod["metadata"].get("deletionTimestamp"):
            self.delete_pod(pod)  # never ran here (or ran before this kubelet): nothing to stop
        elif not finished and (pod.get("status") or {}).get("phase", "Pending") in ACTIVE_PHASES:
            self._run_pod(pod)

    def _run_pod(self, pod: Obj) -> None:
        worker = PodWorker(self, pod)
        with self._lock:  # stop() sets _stopping under the lock: a worker is either in its list or never runs
            if self._stopping.is_set():
                return
            self._workers[worker.uid] = worker
        log.info("pod %s: runs on %s (uid %s)", worker.key, self.node_name, worker.uid)
        worker.thread.start()

    def _vanished(self, pod: Obj) -> None:
        with self._lock:
            worker = self._workers.get(str(pod["metadata"]["uid"]))
        if worker is not None:
            log.info("pod %s: gone from the API; stopping it", worker.key)
            worker.stop(float(pod["spec"].get("terminationGracePeriodSeconds", DEFAULT_GRACE_S)), delete=False)

    def _resync(self) -> None:
        pending = [p for p in self._pods.cache.values() if self._wants_scheduling(p)]
        if pending:
            node = self._read_node()
            for pod in pending:
                self._schedule(pod, node)

    def forget(self, worker: PodWorker) -> None:
        """Called by a worker whose pod is stopped and removed."""
        with self._lock:
            self._workers.pop(worker.uid, None)
            self._finished.add(worker.uid)

    # scheduling

    @staticmethod
    def _wants_scheduling(pod: Obj) -> bool:
        spec, meta = pod["spec"], pod["metadata"]
        return (
            not spec.get("nodeName")
            and not meta.get("deletionTimestamp")
            and spec.get("schedulerName", "default-scheduler") == "default-scheduler"
            and (pod.get("status") or {}).get("phase", "Pending") == "Pending"
        )

    def _schedule(self, pod: Obj, node: Obj | None) -> None:
        if not self._wants_scheduling(pod) or self._stopping.is_set():
            return
        node = node or self._read_node()
        reason = unschedulable_reason(pod, node)
        if reason is None:
            self._bind(pod)
        else:
            self._mark_unschedulable(pod, reason)

    def _bind(self, pod: Obj) -> None:
        meta = pod["metadata"]
        body = kubernetes.client.V1Binding(
            metadata=kubernetes.client.V1ObjectMeta(name=meta["name"], namespace=meta["namespace"], uid=meta["uid"]),
            target=kubernetes.client.V1ObjectReference(api_version="v1", kind="Node", name=self.node_name),
        )
        try:  # raw: some client versions raise a spurious ValueError reading a Binding back
            _drain(
                self.core.create_namespaced_binding(
                    meta["namespace"], body, _preload_content=False, _request_timeout=API_TIMEOUT_S
                )
            )
        except ApiException as exc:
            if exc.status not in (404, 409):  # gone, or bound already: the watch tells what happened
                raise
            return
        log.info("pod %s: scheduled to %s", key_of(pod), self.node_name)

    def _mark_unschedulable(self, pod: Obj, message: str) -> None:
        conditions = (pod.get("status") or {}).get("conditions") or []
        current: Obj = next((c for c in conditions if c.get("type") == "PodScheduled"), {})
        if tuple(current.get(k) for k in ("status", "reason", "message")) == ("False", "Unschedulable", message):
            return  # told already
        condition = {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": message,
            "lastTransitionTime": now(),
            "lastProbeTime": None,
        }
        try:
            _drain(
                self.core.patch_namespaced_pod_status(
                    pod["metadata"]["name"],
                    pod["metadata"]["namespace"],
                    {"status": {"conditions": [condition]}},
                    _preload_content=False,
                    _request_timeout=API_TIMEOUT_S,
                )
            )
        except ApiException as exc:
            if exc.status != 404:  # gone meanwhile: nothing to tell; else the next resync tries again
                log.warning("pod %s: marking it unschedulable failed: %s %s", key_of(pod), exc.status, exc.reason)
            return
        log.info("pod %s: unschedulable: %s", key_of(pod), message)

    # what workers call

    def make_sandbox(self, worker: PodWorker) -> Sandbox:
        if worker.host_network:
            return Sandbox(self.node_netns, tuple(self.host_ips))
        with self._lock:
            free = [n for n in range(1, self.network.capacity + 1) if n not in self._slots]
            if not free:
                raise KubeletError(f"all {self.network.capacity} pod slots of node {self.node_name} are in use")
            self._slots.add(free[0])
        try:
            return self.network.create(free[0])
        except BaseException:
            with self._lock:
                self._slots.discard(free[0])
            raise

    def remove_sandbox(self, sandbox: Sandbox) -> None:
        """Remove a pod's namespace and link, then free its slot (a hostNetwork sandbox has nothing)."""
        if sandbox.slot is not None:
            self.network.remove(sandbox.netns, sandbox.link)
            with self._lock:
                self._slots.discard(sandbox.slot)

    def delete_pod(self, pod: Obj) -> None:
        """Delete a pod for good (grace 0), only the very pod of that uid; gone already is fine."""
        meta = pod["metadata"]
        options = kubernetes.client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=kubernetes.client.V1Preconditions(uid=meta["uid"])
        )
        try:
            _drain(
                self.core.delete_namespaced_pod(
                    meta["name"], meta["namespace"], body=options, _preload_content=False,
                    _request_timeout=API_TIMEOUT_S,
                )
            )  # fmt: skip
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise
            return
        log.info("pod %s: deleted", key_of(pod))

    def container_env(self, worker: PodWorker, sandbox: Sandbox) -> dict[str, str]:
        """The container's environment: PATH and HOSTNAME, then envFrom, then env in order (``$(VAR)``
        expanded against what comes before). ContainerConfigError when a Secret or ConfigMap is missing."""
        pod, container = worker.pod, worker.container
        env = {"PATH": self.container_path, "HOSTNAME": worker.name}
        for source in container.get("envFrom") or []:
            for kind in ("secretRef", "configMapRef"):
                if ref := source.get(kind):
                    data = self._object_data(kind, worker.namespace, ref["name"], bool(ref.get("optional")))
                    env.update({f"{source.get('prefix') or ''}{k}": v for k, v in data.items()})
        fields = self._fields(pod, sandbox)
        for var in container.get("env") or []:
            if "valueFrom" not in var:
                env[var["name"]] = expand(str(var.get("value") or ""), env)
            elif (value := self._value_from(var["valueFrom"], pod, fields)) is not None:
                env[var["name"]] = value
        return env

    def _fields(self, pod: Obj, sandbox: Sandbox) -> dict[str, str]:
        meta, spec = pod["metadata"], pod["spec"]
        return {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.node_name,
            "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
            "status.podIP": sandbox.ips[0],
            "status.podIPs": ",".join(sandbox.ips),
            "status.hostIP": self.host_ips[0],
            "status.hostIPs": ",".join(self.host_ips),
        }

    def _value_from(self, source: Obj, pod: Obj, fields: Mapping[str, str]) -> str | None:
        namespace = str(pod["metadata"]["namespace"])
        if ref := source.get("fieldRef"):
            path = str(ref["fieldPath"])
            if match := _FIELD_INDEX.fullmatch(path):
                return str((pod["metadata"].get(match.group(1)) or {}).get(match.group(2), ""))
            if path not in fields:
                raise ContainerConfigError(f"fieldRef {path} is not supported by the mini kubelet")
            return fields[path]
        for kind, ref_kind in (("secretKeyRef", "secretRef"), ("configMapKeyRef", "configMapRef")):
            if ref := source.get(kind):
                optional = bool(ref.get("optional"))
                data = self._object_data(ref_kind, namespace, ref["name"], optional)
                if ref["key"] not in data and not optional:
                    what = "secret" if kind == "secretKeyRef" else "configmap"
                    raise ContainerConfigError(f"couldn't find key {ref['key']} in {what} {namespace}/{ref['name']}")
                return data.get(ref["key"])
        raise ContainerConfigError(f"valueFrom {sorted(source)} is not supported by the mini kubelet")

    def _object_data(self, kind: str, namespace: str, name: str, optional: bool) -> dict[str, str]:
        """The data of a Secret (decoded) or ConfigMap; {} for a missing optional one."""
        read = self.core.read_namespaced_secret if kind == "secretRef" else self.core.read_namespaced_config_map
        try:
            obj = read_json(read(name, namespace, _preload_content=False, _request_timeout=API_TIMEOUT_S))
        except ApiException as exc:
            if exc.status == 404 and optional:
                return {}
            what = "secret" if kind == "secretRef" else "configmap"
            raise ContainerConfigError(f'{what} "{name}" not found ({exc.status} {exc.reason})') from None
        data = obj.get("data") or {}
        if kind == "secretRef":
            return {k: base64.b64decode(v).decode(errors="replace") for k, v in data.items()}
        return {k: str(v) for k, v in data.items()}

    # the node

    def _read_node(self) -> Obj:
        try:
            return read_json(
                self.core.read_node(self.node_name, _preload_content=False, _request_timeout=API_TIMEOUT_S)
            )
        except ApiException as exc:
            raise KubeletError(
                f"reading node {self.node_name}: {exc.status} {exc.reason}; create it first (ControlPlane.create_node)"
            ) from None

    def _heartbeat_loop(self) -> None:
        last_status = time.monotonic()
        while not self._stopping.wait(LEASE_RENEW_S):
            try:
                self._renew_lease()
                if time.monotonic() - last_status >= NODE_STATUS_S:
                    self._post_ready()
                    last_status = time.monotonic()
            except Exception as exc:  # a missed heartbeat is retried at the next one
                log.warning("node %s: heartbeat failed: %r", self.node_name, exc)

    def _post_ready(self) -> None:
        conditions = (self._read_node().get("status") or {}).get("conditions") or []
        ready: Obj = next((c for c in conditions if c.get("type") == "Ready"), {})
        since = ready.get("lastTransitionTime") if ready.get("status") == "True" else None
        condition = {
            "type": "Ready",
            "status": "True",
            "reason": "KubeletReady",
            "message": "mini kubelet is posting ready status",
            "lastHeartbeatTime": now(),
            "lastTransitionTime": since or now(),
        }
        _drain(
            self.core.patch_node_status(
                self.node_name, {"status": {"conditions": [condition]}}, _preload_content=False,
                _request_timeout=API_TIMEOUT_S,
            )
        )  # fmt: skip

    def _clear_condition_taints(self) -> None:
        """Remove the not-ready and unreachable taints of a node that is Ready now. The API server's
        TaintNodesByCondition admission puts not-ready:NoSchedule on every new Node; the node lifecycle
        controller, which would lift it, does not run in the test control plane."""
        node = self._read_node()
        taints = (node.get("spec") or {}).get("taints") or []
        kept = [t for t in taints if t.get("key") not in CONDITION_TAINTS]
        if len(kept) == len(taints):
            return
        patch = {"metadata": {"resourceVersion": node["metadata"]["resourceVersion"]}, "spec": {"taints": kept or None}}
        _drain(self.core.patch_node(self.node_name, patch, _preload_content=False, _request_timeout=API_TIMEOUT_S))
        log.info(
            "node %s: Ready; removed taints %s",
            self.node_name,
            sorted({t["key"] for t in taints} - {t["key"] for t in kept}),
        )

    def _renew_lease(self) -> None:
        spec = {"holderIdentity": self.node_name, "leaseDurationSeconds": LEASE_DURATION_S}
        renew = _micro_now()
        try:
            _drain(
                self.coordination.patch_namespaced_lease(
                    self.node_name, LEASE_NAMESPACE,
                    {"spec": {**spec, "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S.%fZ")}},
                    _preload_content=False, _request_timeout=API_TIMEOUT_S,
                )
            )  # fmt: skip
            return
        except ApiException as exc:
            if exc.status != 404:
                raise
        owner = kubernetes.client.V1OwnerReference(
            api_version="v1", kind="Node", name=self.node_name, uid=self._node_uid
        )
        lease = kubernetes.client.V1Lease(
            metadata=kubernetes.client.V1ObjectMeta(
                name=self.node_name, namespace=LEASE_NAMESPACE, owner_references=[owner]
            ),
            spec=kubernetes.client.V1LeaseSpec(
                holder_identity=self.node_name, lease_duration_seconds=LEASE_DURATION_S, renew_time=renew
            ),
        )
        _drain(
            self.coordination.create_namespaced_lease(
                LEASE_NAMESPACE, lease, _preload_content=False, _request_timeout=API_TIMEOUT_S
            )
        )

    def _remove_leftovers(self) -> None:
        """Remove every pod namespace and node-side link of this prefix that no worker owns (an earlier
        kubelet's, or one a stuck worker left)."""
        with self._lock:
            owned = {w.sandbox.netns for w in self._workers.values() if w.sandbox and not w.sandbox_removed}
        for name, link in self.network.leftovers():
            if name not in owned:
                log.info("removing leftover pod namespace %s and link %s", name, link)
                self.network.remove(name, link)


def _join(thread: threading.Thread, deadline: Deadline) -> bool:
    thread.join(deadline.remaining())
    return not thread.is_alive()
