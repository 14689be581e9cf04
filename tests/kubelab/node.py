"""One worker node of the test cluster: containerd (with runc and the CNI plugins) and the real kubelet, inside
the lab's node network namespace, in a mount namespace of their own and a cgroup tree of their own.

What keeps the node off the host:

- the network: containerd, the kubelet, the shims and hostNetwork pods live in the node namespace; pods get
  namespaces of containerd's (under its state directory) on a CNI bridge there;
- the mount namespace (``unshare --mount --propagation private``, held by a ``sleep``): the node's own
  directories are bind-mounted over ``/run`` and ``/var/lib`` (containerd's shim sockets, the kubelet's root,
  the CNI cache), and files holding the values the kubelet wants over its six kernel settings, which it then
  only checks (``protectKernelDefaults``); the host's settings stay as they are. Every mount the node makes
  (overlay roots, secret volumes, pod network namespaces) dies with that namespace;
- the cgroup tree ``cgroups.NodeCgroup`` named after the node holds every process of it, so stopping the node
  (or reaping a crashed one) kills by cgroup and leaves nothing running;
- the images come from archives (``.ci/build-agent-image``, ``.ci/build-pause-image``) imported with ``ctr``;
  nothing is ever pulled from a registry the machine cannot reach.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from kubernetes import client

from pytest_svctunnel.errors import LabError
from pytest_svctunnel.names import RUN_LABEL
from pytest_svctunnel.waiting import Deadline

from . import certs
from .cgroups import NodeCgroup
from .controlplane import ControlPlane
from .processes import Supervisor

PAUSE_IMAGE = "localhost/svctunnel-lab-pause:1"
CNI_BIN_DIR = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
KUBELET_PORT = 10250
# The kernel settings the kubelet wants (its setupKernelTunables); it finds them set in its mount namespace.
KERNEL_SETTINGS = {
    "vm/overcommit_memory": "1",
    "vm/panic_on_oom": "0",
    "kernel/panic": "10",
    "kernel/panic_on_oops": "1",
    "kernel/keys/root_maxkeys": "1000000",
    "kernel/keys/root_maxbytes": "25000000",
}
PRIVATE_DIRS = ("/run", "/var/lib")  # the node's own, bind-mounted over the host's in its mount namespace
_CTR_TIMEOUT_S = 120.0
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "all_proxy")


class NodeError(LabError):
    """A test node could not start, run its precondition check, or stop."""


@dataclass(frozen=True)
class NodeSpec:
    """One node: its name (also its network namespace's and its cgroup's), address and pod range."""

    name: str
    address: ipaddress.IPv4Address
    pod_cidr: ipaddress.IPv4Network

    @property
    def netns(self) -> str:
        return self.name


class Node:
    """containerd and the kubelet of one node; ``start()`` returns once the Node is Ready in the API,
    ``stop()`` kills all of it and removes its cgroups and containerd's data (safe twice).
    ``start_runtime()`` alone starts the container runtime without a kubelet (``plane`` may then be None).
    ``runtime_path``: the PATH containerd finds its shim and runc on (default: this one, with the sbin
    directories)."""

    def __init__(
        self,
        spec: NodeSpec,
        plane: ControlPlane | None,
        work_dir: Path,
        images: Sequence[Path],
        runtime_path: str | None = None,
    ) -> None:
        self.spec = spec
        self._plane = plane
        self.work_dir = work_dir
        self.images = list(images)
        self.runtime_path = runtime_path
        self.cgroup = NodeCgroup(spec.name)
        self.procs = Supervisor(work_dir / "logs")
        self.timings: dict[str, float] = {}
        self._holder_pid: int | None = None

    # ---- paths ----

    @property
    def socket(self) -> Path:
        return self.work_dir / "containerd.sock"

    def _names(self, role: str) -> str:
        return f"{role}-{self.spec.name}"

    # ---- starting ----

    @property
    def plane(self) -> ControlPlane:
        if self._plane is None:
            raise NodeError(f"node {self.spec.name} has no control plane; only its runtime can run")
        return self._plane

    def start(self, deadline: Deadline) -> None:
        """The runtime, then the kubelet; on any failure whatever was started is stopped again."""
        try:
            self.start_runtime(deadline)
            self._timed("kubelet", lambda: self._start_kubelet(deadline))
        except BaseException:
            self.stop()
            raise

    def start_runtime(self, deadline: Deadline) -> None:
        """The cgroup, the mount namespace, containerd with the images, and the precondition check. Unlike
        ``start()``, a failure leaves what was started for the caller's ``stop()``."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._timed("cgroup", self.cgroup.create)
        self._write_runtime_files()
        self._timed("mount namespace", lambda: self._start_holder(deadline))
        self._timed("containerd", lambda: self._start_containerd(deadline))
        self._timed("images", lambda: self._import_images(deadline))
        self._timed("precondition", lambda: self.check_runs_containers(deadline))

    def _timed(self, phase: str, step: Callable[[], None]) -> None:
        started = time.monotonic()
        try:
            step()
        finally:
            self.timings[phase] = time.monotonic() - started

    def _write_runtime_files(self) -> None:
        for directory in ("run", "varlib", "sysctl", "cni/net.d", "cni/ipam", "pod-logs", "volume-plugins"):
            (self.work_dir / directory).mkdir(parents=True, exist_ok=True)
        for key, value in KERNEL_SETTINGS.items():
            (self.work_dir / "sysctl" / key.replace("/", "_")).write_text(f"{value}\n")
        (self.work_dir / "containerd.toml").write_text(self._containerd_config())
        (self.work_dir / "cni/net.d/10-svtlab.conflist").write_text(json.dumps(self._cni_config(), indent=1))

    def _write_kubelet_files(self) -> None:
        (self.work_dir / "kubelet.json").write_text(json.dumps(self._kubelet_config(), indent=1))
        server = self.plane.api_server_in(self.spec.netns)
        identity = self.plane.pki.node(self.spec.name)
        self.plane.write_kubeconfig(
            self.work_dir / "kubelet.kubeconfig", server, identity, certs.node_user(self.spec.name)
        )

    def _start_holder(self, deadline: Deadline) -> None:
        """The mount namespace's first process: makes the node's mounts, writes its pid, sleeps."""
        pid_file = self.work_dir / "holder.pid"
        pid_file.unlink(missing_ok=True)
        mounts = [
            f"mount --bind {shlex.quote(str(self.work_dir / 'sysctl' / key.replace('/', '_')))} /proc/sys/{key}"
            for key in KERNEL_SETTINGS
        ]
        mounts += [
            f"mount --bind {shlex.quote(str(self.work_dir / local))} {target}"
            for local, target in zip(("run", "varlib"), PRIVATE_DIRS, strict=True)
        ]
        script = "set -e; " + "; ".join(mounts) + f"; echo $$ > {shlex.quote(str(pid_file))}.part"
        script += f"; mv {shlex.quote(str(pid_file))}.part {shlex.quote(str(pid_file))}; exec sleep infinity"
        unshare = ["unshare", "--mount", "--propagation", "private", "--fork", "--", "sh", "-c", script]
        self.procs.spawn(self._names("mounts"), self._in_cgroup(unshare))

        def ready() -> tuple[bool, str]:
            if pid_file.exists() and (text := pid_file.read_text().strip()):
                self._holder_pid = int(text)
                return True, f"holder pid {text}"
            return False, f"no {pid_file} yet"

        self.procs.await_ready(
            self._names("mounts"), ready, deadline, "the node's mount namespace was not made; see its log"
        )

    def _in_cgroup(self, argv: Sequence[str]) -> list[str]:
        """``argv`` started from a shell that first moved itself into the node's cgroup."""
        return ["sh", "-c", f'{self.cgroup.enter_command()}; exec "$@"', "sh", *argv]

    def _in_node(self, argv: Sequence[str]) -> list[str]:
        """``argv`` in the node's mount and network namespaces."""
        if self._holder_pid is None:
            raise NodeError(f"node {self.spec.name}: its mount namespace is not there; start() it first")
        return [
            "nsenter",
            f"--mount=/proc/{self._holder_pid}/ns/mnt",
            f"--net=/run/netns/{self.spec.netns}",
            "--",
            *argv,
        ]

    def _start_containerd(self, deadline: Deadline) -> None:
        name = self._names("containerd")
        argv = self._in_cgroup(self._in_node(["containerd", "--config", str(self.work_dir / "containerd.toml")]))
        self.procs.spawn(name, argv, env=_runtime_env(self.runtime_path))
        self.procs.await_ready(
            name, self._containerd_answers, deadline, "containerd never answered on its socket; see its log"
        )

    def _containerd_answers(self) -> tuple[bool, str]:
        done = self.ctr("version", check=False, timeout=5.0)
        return done.returncode == 0, (done.stdout + done.stderr).strip()[-300:]

    def ctr(
        self, *args: str, check: bool = True, timeout: float = _CTR_TIMEOUT_S, namespace: str = "k8s.io"
    ) -> subprocess.CompletedProcess[str]:
        """``ctr`` against this node's containerd, in the node's namespaces (its fifos go to the node's /run)."""
        argv = self._in_node(["ctr", "--address", str(self.socket), "--namespace", namespace, *args])
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise NodeError(f"node {self.spec.name}: 'ctr {' '.join(args)}' did not end within {timeout:g} s") from None
        if check and done.returncode != 0:
            raise NodeError(
                f"node {self.spec.name}: 'ctr {' '.join(args)}' failed ({done.returncode}): {done.stderr.strip()}"
            )
        return done

    def _import_images(self, deadline: Deadline) -> None:
        for archive in self.images:
            self.ctr("images", "import", str(archive), timeout=max(1.0, deadline.remaining()))

    def check_runs_containers(self, deadline: Deadline) -> None:
        """The precondition: one tiny container (the pause image's ``-v``) runs here with runc."""
        for attempt in range(3):  # ctr can lose a container's output that fast (exit 0, nothing printed): again
            done = self.ctr(
                "run", "--rm", "--cgroup", f"{self.cgroup.path}/check", PAUSE_IMAGE,
                f"svt-check-{self.spec.name}-{attempt}", "/pause", "-v",
                check=False, timeout=max(1.0, min(60.0, deadline.remaining())),
            )  # fmt: skip
            if done.returncode != 0 or "svctunnel-lab pause" in done.stdout:
                break
        if done.returncode != 0 or "svctunnel-lab pause" not in done.stdout:
            raise NodeError(
                f"this machine cannot run containers: 'ctr run' of the pause image failed ({done.returncode}):"
                f" {(done.stderr or done.stdout).strip()[-800:]}\n"
                "The e2e tests' node needs containerd and runc ('bash .ci/install'), overlayfs"
                f" ({'present' if _has_overlayfs() else 'MISSING'} in /proc/filesystems), cgroup v1 hierarchies"
                " under /sys/fs/cgroup, and root with CAP_SYS_ADMIN; containerd's log is"
                f" {self.procs.log_path(self._names('containerd'))}"
            )

    def running_sandboxes(self, run_id: str) -> list[str]:
        """Ids of the pod sandboxes of ``run_id`` (pods labelled with it) that still have a task here: a pod of
        the run whose containers, shim or network namespace still exist. (A stopped sandbox's record stays until
        the kubelet's next garbage collection; that is no leak.)"""
        sandboxes = self.ctr("containers", "list", "--quiet", f'labels."{RUN_LABEL}"=={run_id}', timeout=30.0)
        tasks = self.ctr("tasks", "list", "--quiet", timeout=30.0)
        return sorted(set(sandboxes.stdout.split()) & set(tasks.stdout.split()))

    def pod_pid(self, namespace: str, pod: str) -> int:
        """The pid (in this host's pid namespace) of the pod's sandbox: its network namespace is the pod's."""
        match = ",".join(
            f'labels."{key}"=={value}'
            for key, value in (
                ("io.kubernetes.pod.namespace", namespace),
                ("io.kubernetes.pod.name", pod),
                ("io.cri-containerd.kind", "sandbox"),
            )
        )
        ids = set(self.ctr("containers", "list", "--quiet", match, timeout=30.0).stdout.split())
        for line in self.ctr("tasks", "list", timeout=30.0).stdout.splitlines()[1:]:
            task, pid, status = [*line.split(), "", "", ""][:3]
            if task in ids and status == "RUNNING":
                return int(pid)
        raise NodeError(f"node {self.spec.name}: no running sandbox of pod {namespace}/{pod}")

    def _start_kubelet(self, deadline: Deadline) -> None:
        self._write_kubelet_files()
        name = self._names("kubelet")
        argv = [
            str(self.plane.bin_dir / "kubelet"),
            f"--config={self.work_dir / 'kubelet.json'}",
            f"--kubeconfig={self.work_dir / 'kubelet.kubeconfig'}",
            f"--hostname-override={self.spec.name}",
            f"--node-ip={self.spec.address}",
            "--v=2",
        ]
        self.procs.spawn(name, self._in_cgroup(self._in_node(argv)), env=_runtime_env())
        self.procs.await_ready(name, self._node_ready, deadline, "the kubelet never reported its Node Ready")

    def _node_ready(self) -> tuple[bool, str]:
        with self.plane.api_client() as api:
            try:
                node = client.CoreV1Api(api).read_node(self.spec.name, _request_timeout=5.0)
            except Exception as exc:  # not registered yet, or the API server is busy: the next probe tells
                return False, f"Node {self.spec.name}: {exc}".splitlines()[0]
        conditions = {c.type: c for c in node.status.conditions or []}
        ready = conditions.get("Ready")
        taints = [t.key for t in node.spec.taints or []]
        if ready is not None and ready.status == "True" and not taints:
            return True, "Ready"
        state = f"Ready={ready.status if ready else '?'} {ready.message if ready else ''}".strip()
        return False, f"Node {self.spec.name}: {state}; taints {', '.join(taints) or 'none'}"

    # ---- configuration ----

    def _containerd_config(self) -> str:
        work = self.work_dir
        return f"""version = 2
root = "{work / "containerd/root"}"
state = "{work / "containerd/state"}"
oom_score = 0
disabled_plugins = ["io.containerd.internal.v1.opt"]

[grpc]
  address = "{self.socket}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  netns_mounts_under_state_dir = true
  disable_apparmor = true
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{work / "cni/net.d"}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
"""

    def _cni_config(self) -> dict[str, object]:
        ipam = {
            "type": "host-local",
            "ranges": [[{"subnet": str(self.spec.pod_cidr)}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": str(self.work_dir / "cni/ipam"),
        }
        bridge = {"type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False, "hairpinMode": True}
        return {"cniVersion": "0.4.0", "name": "svtlab", "plugins": [{**bridge, "ipam": ipam}]}

    def _kubelet_config(self) -> dict[str, object]:
        work = self.work_dir
        socket = f"unix://{self.socket}"
        off = "0%"  # a threshold of 0% is no threshold: the CI machine's disk must not evict the tests' pods
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": str(self.spec.address),  # logs and exec: the API server reaches the node here
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": False},
                "x509": {"clientCAFile": str(self.plane.pki.ca.cert)},
            },
            "authorization": {"mode": "AlwaysAllow"},  # whoever has a certificate of the lab's CA
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup.path,
            "failCgroupV1": False,
            "failSwapOn": False,
            "protectKernelDefaults": True,  # check the kernel settings, never write them
            "oomScoreAdj": 0,  # a negative one needs CAP_SYS_RESOURCE
            "containerRuntimeEndpoint": socket,
            "imageServiceEndpoint": socket,
            "podLogsDir": str(work / "pod-logs"),
            "volumePluginDir": str(work / "volume-plugins"),
            "serializeImagePulls": False,
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                signal: off
                for signal in ("memory.available", "nodefs.available", "nodefs.inodesFree", "imagefs.available")
            },
            "rotateCertificates": False,
            "serverTLSBootstrap": False,
            "resolvConf": "/etc/resolv.conf",
            "maxPods": 50,
        }

    # ---- stopping ----

    def stop(self, timeout: float = 60.0) -> None:
        """Stop the kubelet, then containerd, then kill whatever the node still runs (shims, containers, the
        mount namespace's holder) by its cgroup; remove the cgroups and containerd's data. Safe twice."""
        deadline = Deadline.after(timeout)
        problems = self.procs.terminate([self._names("kubelet")], deadline)
        problems += self.procs.terminate([self._names("containerd")], deadline)
        try:
            self.cgroup.remove(deadline)
        except LabError as exc:
            problems.append(str(exc))
        problems += self.procs.terminate(self.procs.names, deadline)
        self._holder_pid = None
        for state in ("containerd", "cni/ipam", "run", "varlib", "pod-logs"):  # what ran; configurations and logs stay
            shutil.rmtree(self.work_dir / state, ignore_errors=True)  # containerd's: the images, hundreds of MB
        if problems:
            raise NodeError(f"stopping node {self.spec.name}: {'; '.join(problems)}")

    def log_path(self, role: str) -> Path:
        """The log of ``role``: containerd, kubelet or mounts."""
        return self.procs.log_path(self._names(role))


def _runtime_env(path_override: str | None = None) -> dict[str, str]:
    """containerd's and the kubelet's environment: this one without proxies (nothing is pulled through them),
    with the sbin directories (runc, mount, nsenter), or exactly ``path_override`` as PATH."""
    env = {k: v for k, v in os.environ.items() if k.lower() not in _PROXY_VARIABLES}
    if path_override is not None:
        return {**env, "PATH": path_override}
    path = env.get("PATH", "/usr/bin:/bin").split(":")
    env["PATH"] = ":".join([*path, *(d for d in ("/usr/sbin", "/sbin") if d not in path)])
    return env


def _has_overlayfs() -> bool:
    return "overlay" in Path("/proc/filesystems").read_text().split()
