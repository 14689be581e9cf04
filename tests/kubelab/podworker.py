"""One pod on the mini kubelet: ``PodWorker`` runs a pod bound to the node in a thread of its own (sandbox,
container, readiness, restarts with backoff and CrashLoopBackOff, image errors) and publishes the pod's
status."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from kubernetes.client.exceptions import ApiException

from .container import ContainerProcess, ReadinessProbe, exit_code, run_exec_probe
from .containerspec import DEFAULT_PATH, capabilities, container_command, resolve_executable
from .errors import ContainerConfigError, KubeletError, StartError
from .kubewatch import API_TIMEOUT_S, RETRY_S, Obj, drain, now
from .podnet import Sandbox

if TYPE_CHECKING:
    from .kubelet import MiniKubelet

log = logging.getLogger(__name__)

TICK_S = 0.1  # how often a pod's process is polled
MAX_GRACE_S = 10.0  # cap on a pod's termination grace period
BACKOFF_FIRST_S, BACKOFF_MAX_S = 0.5, 5.0  # restart backoff doubles from the first to the max
QUICK_EXIT_S = 10.0  # an exit this soon after the start counts towards a crash loop
CRASH_LOOP_AFTER = 3  # quick exits in a row before the status says CrashLoopBackOff
IMAGE_BACKOFF_S = 1.0  # ErrImagePull turns into ImagePullBackOff after this
CONFIG_RETRY_S = 1.0  # a container whose env cannot be resolved (missing Secret) retries after this
DEFAULT_GRACE_S = 30  # terminationGracePeriodSeconds when the spec has none


def _full_state(state: Obj) -> Obj:
    """A container state with the other two kinds set to null, so a strategic merge patch removes them."""
    return {kind: state.get(kind) for kind in ("waiting", "running", "terminated")}


def describe_state(state: Obj) -> str:
    """A container state in a few words, for logs and summaries."""
    if "running" in state:
        return "running"
    if "terminated" in state:
        t = state["terminated"]
        return f"terminated ({t.get('reason')}, exit code {t.get('exitCode')})"
    w = state.get("waiting") or {}
    return f"waiting ({w.get('reason')}{': ' + w['message'] if w.get('message') else ''})"


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
            drain(
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
