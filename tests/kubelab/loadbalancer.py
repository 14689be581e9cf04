"""A load-balancer controller for the test control plane: what MetalLB or cloud-provider-kind does in KinD.

It has two modes, chosen per Service when it gets its address (``use`` switches for what comes next):

- **routed** (MetalLB's L2 mode): the address is routed to the nodes and kube-proxy does the rest, so the pod
  sees the client's own address and port; ``status.loadBalancer.ingress: [{ip, ipMode: VIP}]``.
- **proxy** (cloud-provider-kind): a userspace UDP proxy of the Service's own holds the address and forwards
  each client session, from a new source port of its own, to the node port of a healthy node; idle sessions
  are dropped (``lbproxy``, ``udpproxy``); ``ipMode: Proxy``.

Services of type LoadBalancer in all namespaces get the first free address of the mode's pool; the address is
freed when the Service goes or stops being a LoadBalancer (its status is then cleared). A Service that asks for a
pool address in ``spec.loadBalancerIP`` gets that one if it is free; one that already carries a pool address keeps
it (a restarted controller adopts it). Services with a ``loadBalancerClass`` belong to another controller,
IPv6-only ones cannot get a pool address, and ``loadBalancerSourceRanges`` are left as they are: kube-proxy
enforces them (and a proxy does not, as cloud-provider-kind's does not for UDP). In routed mode the packets go
where ``lbrouting.HealthRouter`` routes them: to the nodes that pass the Service's health check.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from pytest_svctunnel.errors import LabError

from .kubewatch import API_TIMEOUT_S, Obj, ObjectWatch, key_of
from .lbproxy import ProxyConfig, ServiceProxy
from .lbrouting import HealthRouter, Target

log = logging.getLogger(__name__)

MODES = ("routed", "proxy")
IDLE_S = 60.0  # Envoy's udp_proxy drops a session after this long without a datagram
CHECK_S = 2.0  # cloud-provider-kind's health check interval


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


_IP_MODES = {"routed": "VIP", "proxy": "Proxy"}


def _ip_mode(service: Obj) -> str | None:
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return str(ingress[0].get("ipMode")) if ingress else None


def _ingress_ips(service: Obj) -> list[str]:
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    return [str(i["ip"]) for i in ingress if i.get("ip")]


class LoadBalancerController:
    """Assigns pool addresses to LoadBalancer Services, in a watch thread of its own; ``start()`` returns once
    the Services are listed, ``stop()`` ends the thread (safe twice). ``assigned`` shows who has what."""

    def __init__(
        self,
        api: kubernetes.client.ApiClient,
        pools: Mapping[str, Sequence[ipaddress.IPv4Address]],
        router_netns: str,
        nodes: Mapping[str, ipaddress.IPv4Address],
        run_id: str,
        work_dir: Path,
    ) -> None:
        if set(pools) != set(MODES) or not all(pools.values()):
            raise LoadBalancerError(f"give an address pool for each mode ({', '.join(MODES)}), none empty")
        self.core = kubernetes.client.CoreV1Api(api)
        self.pools = {mode: list(pool) for mode, pool in pools.items()}
        self.pool = [a for pool in self.pools.values() for a in pool]
        self.mode, self.idle_s, self.check_s = "routed", IDLE_S, CHECK_S
        self.nodes = dict(nodes)
        self.run_id, self.work_dir, self.router_netns = run_id, work_dir, router_netns
        self._modes: dict[str, str] = {}  # uid -> the mode the Service got its address in
        self._proxies: dict[str, ServiceProxy] = {}  # uid -> its proxy (proxy mode)
        self._numbers = itertools.count()
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
        for proxy in list(self._proxies.values()):
            proxy.stop()
        self._proxies.clear()

    @contextlib.contextmanager
    def use(self, mode: str, idle_s: float = IDLE_S, check_s: float = CHECK_S) -> Iterator[None]:
        """Services that get their address meanwhile get it in ``mode`` (proxy: sessions idle out after
        ``idle_s``, nodes checked every ``check_s``); afterwards routed mode again."""
        if mode not in MODES:
            raise LoadBalancerError(f"mode {mode!r}: choose one of {', '.join(MODES)}")
        self.mode, self.idle_s, self.check_s = mode, idle_s, check_s
        try:
            yield
        finally:
            self.mode, self.idle_s, self.check_s = "routed", IDLE_S, CHECK_S

    def proxies(self) -> list[ServiceProxy]:
        """The proxies running now (one per Service given its address in proxy mode)."""
        with self._lock:
            return list(self._proxies.values())

    def _targets(self) -> list[Target]:
        """Every assigned address with its Service's health check port (Local policy) or 0 (every node)."""
        with self._lock:  # a proxy's address is routed to its proxy, whatever the health checks say
            assigned = {uid: a for uid, a in self._by_uid.items() if self._modes.get(uid) != "proxy"}
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
        mode = self._modes[uid]
        if mode == "proxy" and not self._proxied(uid, service, address):
            return
        if current != [str(address)] or _ip_mode(service) != _IP_MODES[mode]:
            self._patch(service, address, _IP_MODES[mode])
            log.info("service %s: load-balancer address %s (%s)", key, address, mode)

    def _proxied(self, uid: str, service: Obj, address: ipaddress.IPv4Address) -> bool:
        """Whether the Service's proxy runs with what its spec says now (started or restarted here)."""
        config = self._proxy_config(service)
        if config is None:
            return False  # no UDP node port yet
        proxy = self._proxies.get(uid)
        if proxy is None:
            proxy = ServiceProxy(self.run_id, next(self._numbers), self.router_netns, address, self.work_dir)
            with self._lock:
                self._proxies[uid] = proxy
        try:
            proxy.ensure(config)
        except LabError as exc:
            log.warning("service %s: %s", key_of(service), exc)
            return False
        return True

    def _proxy_config(self, service: Obj) -> ProxyConfig | None:
        spec = service.get("spec") or {}
        ports = tuple(
            (int(p["port"]), int(p["nodePort"]))
            for p in spec.get("ports") or []
            if p.get("protocol", "TCP") == "UDP" and p.get("nodePort")
        )
        if not ports:
            return None
        local = spec.get("externalTrafficPolicy") == "Local"
        return ProxyConfig(
            ports,
            tuple(str(a) for a in self.nodes.values()),
            int(spec.get("healthCheckNodePort") or 0) if local else 0,
            self.idle_s,
            self.check_s,
        )

    def _claim(self, uid: str, key: str, service: Obj, current: list[str]) -> ipaddress.IPv4Address | None:
        """The address this Service gets (its own already, the one it asks for, or the first free); None when
        the pool is exhausted. Runs under the lock."""
        taken = set(self._by_uid.values())
        requested = (service.get("spec") or {}).get("loadBalancerIP")
        wishes = [*current, *([requested] if requested else [])]
        for wish in wishes:
            with contextlib.suppress(ValueError):
                address = ipaddress.ip_address(wish)
                for mode, pool in self.pools.items():
                    if address in pool and address not in taken:
                        return self._record(uid, key, address, mode)  # type: ignore[arg-type]
        free = [a for a in self.pools[self.mode] if a not in taken]
        return self._record(uid, key, free[0], self.mode) if free else None

    def _record(self, uid: str, key: str, address: ipaddress.IPv4Address, mode: str) -> ipaddress.IPv4Address:
        self._by_uid[uid] = address
        self._names[uid] = key
        self._modes[uid] = mode
        return address

    def _free(self, uid: str, key: str, why: str) -> bool:
        proxy = self._proxies.get(uid)
        if proxy is not None:
            proxy.stop()  # before it leaves the list: ``proxies()`` lists what may still run
        with self._lock:
            address = self._by_uid.pop(uid, None)
            self._names.pop(uid, None)
            self._modes.pop(uid, None)
            self._proxies.pop(uid, None)
        self._exhausted.discard(uid)
        if address is None:
            return False
        log.info("service %s: %s; address %s is free again", key, why, address)
        return True

    def _patch(self, service: Obj, address: ipaddress.IPv4Address | None, ip_mode: str = "VIP") -> None:
        ingress: Any = [{"ip": str(address), "ipMode": ip_mode}] if address else None
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
