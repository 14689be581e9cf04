"""A load-balancer controller for the test control plane: what a cloud's service controller (or MetalLB) does.

Services of type LoadBalancer in all namespaces get the first free address of a pool as
``status.loadBalancer.ingress: [{ip, ipMode: VIP}]``; the address is freed when the Service goes or stops being
a LoadBalancer (its status is then cleared). A Service that asks for a pool address in ``spec.loadBalancerIP``
gets that one if it is free; one that already carries a pool address keeps it (a restarted controller adopts
it). Services with a ``loadBalancerClass`` belong to another controller, IPv6-only ones cannot get a pool
address, and ``loadBalancerSourceRanges`` are left as they are: kube-proxy enforces them. The packets go where
``lbrouting.HealthRouter`` routes them: to the nodes that pass the Service's health check.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from pytest_svctunnel.errors import LabError

from .kubewatch import API_TIMEOUT_S, Obj, ObjectWatch, key_of
from .lbrouting import HealthRouter, Target

log = logging.getLogger(__name__)


class LoadBalancerError(LabError):
    """The load-balancer controller could not start or stop."""


def _wants_address(service: Obj) -> bool:
    spec = service.get("spec") or {}
    return (
        spec.get("type") == "LoadBalancer"
        and not spec.get("loadBalancerClass")
        and not service["metadata"].get("deletionTimestamp")
        and "IPv4" in (spec.get("ipFamilies") or ["IPv4"])
    )


def _ingress_ips(service: Obj) -> list[str]:
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return [str(i["ip"]) for i in ingress if i.get("ip")]


class LoadBalancerController:
    """Assigns pool addresses to LoadBalancer Services, in a watch thread of its own; ``start()`` returns once
    the Services are listed, ``stop()`` ends the thread (safe twice). ``assigned`` shows who has what."""

    def __init__(
        self,
        api: kubernetes.client.ApiClient,
        pool: Sequence[ipaddress.IPv4Address],
        router_netns: str,
        nodes: Mapping[str, ipaddress.IPv4Address],
    ) -> None:
        if not pool:
            raise LoadBalancerError("the load-balancer pool is empty; pass at least one IPv4 address")
        self.core = kubernetes.client.CoreV1Api(api)
        self.pool = list(pool)
        self._lock = threading.Lock()
        self._by_uid: dict[str, ipaddress.IPv4Address] = {}
        self._names: dict[str, str] = {}  # uid -> namespace/name, for messages
        self._exhausted: set[str] = set()  # uids already told that the pool is exhausted
        self._watch = ObjectWatch("services", self.core.list_service_for_all_namespaces, self._on_change, self._resync)
        self.router = HealthRouter(router_netns, nodes, self._targets)

    def start(self, timeout: float = 30.0) -> None:
        self._watch.start()
        if not self._watch.synced.wait(timeout):
            raise LoadBalancerError(f"no Service list after {timeout:g} s; is the API server up? (the log shows why)")
        self.router.start()
        log.info("load-balancer controller started (pool %s .. %s)", self.pool[0], self.pool[-1])

    def stop(self, timeout: float = 10.0) -> None:
        self._watch.stop()
        if not self._watch.join(timeout):
            raise LoadBalancerError(f"the Service watch did not stop within {timeout:g} s")
        self.router.stop()

    def _targets(self) -> list[Target]:
        """Every assigned address with its Service's health check port (Local policy) or 0 (every node)."""
        with self._lock:
            assigned = dict(self._by_uid)
        targets = []
        for uid, address in assigned.items():
            spec = (self._watch.cache.get(uid) or {}).get("spec") or {}
            local = spec.get("externalTrafficPolicy") == "Local"
            targets.append(Target(address, int(spec.get("healthCheckNodePort") or 0) if local else 0))
        return targets

    # the watch thread

    def _on_change(self, old: Obj | None, service: Obj | None) -> None:
        if service is None:
            assert old is not None
            if self._free(str(old["metadata"]["uid"]), key_of(old), "deleted"):
                self._resync()  # a Service that waits for an address gets this one
        elif _wants_address(service):
            self._ensure(service)
        elif self._free(
            str(service["metadata"]["uid"]), key_of(service), "no longer a LoadBalancer of this controller"
        ):
            self._patch(service, None)
            self._resync()

    def _resync(self) -> None:
        for service in list(self._watch.cache.values()):
            if _wants_address(service):  # also retries status updates that failed
                self._ensure(service)

    def _ensure(self, service: Obj) -> None:
        uid, key = str(service["metadata"]["uid"]), key_of(service)
        current = _ingress_ips(service)
        with self._lock:
            address = self._by_uid.get(uid) or self._claim(uid, key, service, current)
        if address is None:
            if uid not in self._exhausted:
                log.warning("service %s: no free address in the pool (%d, all taken)", key, len(self.pool))
                self._exhausted.add(uid)
            return
        self._exhausted.discard(uid)
        if current != [str(address)]:
            self._patch(service, address)
            log.info("service %s: load-balancer address %s", key, address)

    def _claim(self, uid: str, key: str, service: Obj, current: list[str]) -> ipaddress.IPv4Address | None:
        """The address this Service gets (its own already, the one it asks for, or the first free); None when
        the pool is exhausted. Runs under the lock."""
        taken = set(self._by_uid.values())
        requested = (service.get("spec") or {}).get("loadBalancerIP")
        wishes = [*current, *([requested] if requested else [])]
        for wish in wishes:
            with contextlib.suppress(ValueError):
                address = ipaddress.ip_address(wish)
                if address in self.pool and address not in taken:
                    return self._record(uid, key, address)  # type: ignore[arg-type]
        free = [a for a in self.pool if a not in taken]
        return self._record(uid, key, free[0]) if free else None

    def _record(self, uid: str, key: str, address: ipaddress.IPv4Address) -> ipaddress.IPv4Address:
        self._by_uid[uid] = address
        self._names[uid] = key
        return address

    def _free(self, uid: str, key: str, why: str) -> bool:
        with self._lock:
            address = self._by_uid.pop(uid, None)
            self._names.pop(uid, None)
        self._exhausted.discard(uid)
        if address is None:
            return False
        log.info("service %s: %s; address %s is free again", key, why, address)
        return True

    def _patch(self, service: Obj, address: ipaddress.IPv4Address | None) -> None:
        ingress: Any = [{"ip": str(address), "ipMode": "VIP"}] if address else None
        meta = service["metadata"]
        try:
            response: Any = self.core.patch_namespaced_service_status(
                meta["name"],
                meta["namespace"],
                {"status": {"loadBalancer": {"ingress": ingress}}},
                _preload_content=False,
                _request_timeout=API_TIMEOUT_S,
            )
            response.read()
            response.release_conn()
        except ApiException as exc:
            if exc.status != 404:  # gone: the watch frees it
                log.warning("service %s: status update failed: %s %s", key_of(service), exc.status, exc.reason)
