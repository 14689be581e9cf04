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
DNS.

The parts: ``kubewatch`` (list/watch, shared with the load-balancer controller), ``scheduling`` (does a pod
fit), ``podnet`` (pod namespaces and addresses), ``containerspec`` (argv, capabilities, environment),
``container`` (the process and its probes), ``podworker`` (one pod), ``nodestatus`` (Ready and the Lease);
this module ties them together.
"""

from __future__ import annotations

import ipaddress
import logging
import sys
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from pytest_svctunnel import names
from pytest_svctunnel.waiting import Deadline

from .container import Tools
from .containerspec import DEFAULT_PATH, container_env, pod_fields
from .errors import KubeletError
from .kubewatch import API_TIMEOUT_S, Obj, ObjectWatch, drain, key_of, now, read_json
from .nodestatus import NodeStatus, internal_ips
from .podnet import IPNetwork, PodNetwork, Sandbox
from .podworker import DEFAULT_GRACE_S, PodWorker
from .scheduling import unschedulable_reason, wants_scheduling

__all__ = ["KubeletError", "MiniKubelet", "Obj", "read_json"]  # what scripts driving the kubelet import from here

log = logging.getLogger(__name__)

STOP_GRACE_S = 2.0  # grace of the containers when the kubelet itself stops
ACTIVE_PHASES = ("Pending", "Running", "Unknown")


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
        if names.run_of_netns(pod_prefix) is None:
            raise KubeletError(f"pod namespace prefix {pod_prefix!r} must start with the run's 'svt-<id>-'")
        self.core = kubernetes.client.CoreV1Api(api)
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
        self._lock = threading.Lock()
        self._workers: dict[str, PodWorker] = {}
        self._finished: set[str] = set()  # uids whose worker ended: never run again
        self._slots: set[int] = set()
        self._stopping = threading.Event()
        self._pods = ObjectWatch("pods", self.core.list_pod_for_all_namespaces, self._on_pod, self._resync)
        self._node = NodeStatus(api, node_name)
        self._beat = threading.Thread(
            target=self._node.heartbeat, args=(self._stopping,), name=f"heartbeat-{node_name}", daemon=True
        )
        self._started = False

    # lifecycle

    def start(self, timeout: float = 30.0) -> None:
        """Read the node, remove leftovers of an earlier kubelet with the same prefix, post the node Ready,
        and start watching pods; returns once the first pod list is in."""
        deadline = Deadline.after(timeout)
        node = self._node.read()
        self._node.uid = str(node["metadata"]["uid"])
        self.host_ips = internal_ips(node)
        if not self.host_ips:
            raise KubeletError(f"node {self.node_name} has no InternalIP address; create it with one")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        self._started = True
        if self.heartbeat:
            self._node.post_ready()
            self._node.clear_condition_taints()
            self._node.renew_lease()
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
        pending = [p for p in self._pods.cache.values() if wants_scheduling(p)]
        if pending:
            node = self._node.read()
            for pod in pending:
                self._schedule(pod, node)

    def forget(self, worker: PodWorker) -> None:
        """Called by a worker whose pod is stopped and removed."""
        with self._lock:
            self._workers.pop(worker.uid, None)
            self._finished.add(worker.uid)

    # scheduling

    def _schedule(self, pod: Obj, node: Obj | None) -> None:
        if not wants_scheduling(pod) or self._stopping.is_set():
            return
        node = node or self._node.read()
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
            drain(
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
            drain(
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
            drain(
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
        base = {"PATH": self.container_path, "HOSTNAME": worker.name}
        fields = pod_fields(worker.pod, self.node_name, sandbox.ips, self.host_ips)
        return container_env(self.core, worker.pod, worker.container, base, fields)

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
