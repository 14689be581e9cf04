"""A real Kubernetes control plane on this host: etcd, kube-apiserver, kube-controller-manager and kube-scheduler
on loopback in this network namespace, and kube-proxy (nftables mode) inside lab node namespaces.

Everything lives under one work directory: certificates, etcd's data, kubeconfigs, kube-proxy configurations and
one log per process (``<component>.log``). Processes run in sessions of their own (``processes.Supervisor``), so
a Ctrl-C of the test run reaches only the test runner, whose cleanup then calls ``stop()``. Programs inside a
node namespace reach the API server through a forwarder on 127.0.0.1 there (``api_server_in``).
"""

from __future__ import annotations

import contextlib
import http.client
import ipaddress
import json
import os
import shutil
import socket
import ssl
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from kubernetes import client, config

from pytest_svctunnel import netns as netns_mod
from pytest_svctunnel import nft
from pytest_svctunnel.errors import LabError, SvcTunnelError
from pytest_svctunnel.waiting import Deadline

from . import certs
from .certs import CertKey, Pki
from .forward import NetnsForwarder, free_ports_in, socket_in_netns
from .processes import KILL_GRACE_S, STOP_GRACE_S, Supervisor

SERVICE_CIDR = "10.96.0.0/16"
SERVICE_IP = str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))  # the ClusterIP of Service "kubernetes"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
# Canonical names (kube-controller-manager --help lists them); the old short names are still accepted as aliases.
CONTROLLERS = (
    "deployment-controller",
    "replicaset-controller",
    "endpointslice-controller",
    "namespace-controller",
    "node-lifecycle-controller",  # lifts the not-ready taint a kubelet registers its Node with
    "garbage-collector-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    "root-ca-certificate-publisher-controller",  # kube-root-ca.crt in every namespace, for token volumes
)
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubelet")
KUBE_PROXY_TABLES = (("ip", "kube-proxy"), ("ip6", "kube-proxy"))
_PROBE_TIMEOUT_S = 2.0
_BUILD_HINT = "build the binaries with 'bash .ci/build-kube' (its last line is the bin directory)"


class ControlPlaneError(LabError):
    """A control plane process could not be started, stopped or reached."""


class ControlPlane:
    """A Kubernetes control plane for end-to-end tests (the nodes are ``node.Node``).

    ``start()`` brings up etcd, kube-apiserver, kube-controller-manager and kube-scheduler;
    ``start_kube_proxy()`` adds kube-proxy in a lab node namespace; ``stop()`` undoes all of it (safe twice, and
    after a failed or partial start). ``timings`` holds the seconds each start phase took."""

    def __init__(self, bin_dir: Path, work_dir: Path, node_names: Sequence[str] = ()) -> None:
        self.bin_dir = bin_dir
        self.work_dir = work_dir
        self.node_names = tuple(node_names)
        self.timings: dict[str, float] = {}
        self.procs = Supervisor(work_dir)
        self._forwarders: dict[str, NetnsForwarder] = {}  # by node namespace
        self._proxy_netns: list[str] = []  # namespaces where a kube-proxy may have left nftables tables
        self._pki: Pki | None = None
        self._api_port: int | None = None

    # ---- the control plane ----

    def start(self, timeout: float = 180.0) -> None:
        """Start etcd, kube-apiserver, kube-controller-manager and kube-scheduler; return once all are healthy.

        On any failure (or interruption) whatever was started is stopped again before the error propagates."""
        if self.procs.names:
            raise ControlPlaneError("the control plane is already running; stop() it before starting it again")
        deadline = Deadline.after(timeout)
        self._check_binaries()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            with self._timed("certificates"):
                pki = self._pki = certs.generate(self.work_dir / "pki", SERVICE_IP, self.node_names)
            etcd_client, etcd_peer, etcd_metrics, api, kcm, scheduler = _free_loopback_ports(6)
            with self._timed("etcd"):
                self._start_etcd(pki, etcd_client, etcd_peer, etcd_metrics, deadline)
            with self._timed("kube-apiserver"):
                self._start_apiserver(pki, api, etcd_client, deadline)
            with self._timed("kube-controller-manager"):
                self._start_controller_manager(pki, kcm, deadline)
            with self._timed("kube-scheduler"):
                self._start_scheduler(pki, scheduler, deadline)
        except BaseException:
            self.stop()  # should this fail too, Python chains the original error as its context
            raise

    def _check_binaries(self) -> None:
        for name in BINARIES:
            path = self.bin_dir / name
            if not os.access(path, os.X_OK):
                raise ControlPlaneError(f"{path} is missing or not executable; {_BUILD_HINT}")

    def _start_etcd(self, pki: Pki, client_port: int, peer_port: int, metrics_port: int, deadline: Deadline) -> None:
        data_dir = self.work_dir / "etcd-data"
        shutil.rmtree(data_dir, ignore_errors=True)  # a member's data remembers its old peer URL
        client_url, peer_url = f"https://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"
        argv = [
            str(self.bin_dir / "etcd"),
            "--name=svctunnel-lab",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=svctunnel-lab={peer_url}",
            "--initial-cluster-state=new",
            f"--listen-metrics-urls=http://127.0.0.1:{metrics_port}",  # plain-HTTP /health for the readiness probe
            f"--cert-file={pki.etcd_server.cert}",
            f"--key-file={pki.etcd_server.key}",
            f"--trusted-ca-file={pki.ca.cert}",
            "--client-cert-auth=true",
            "--unsafe-no-fsync=true",  # the data dies with the lab; fsync on a busy CI disk costs seconds
        ]
        self.procs.spawn("etcd", argv)
        self.procs.await_ready(
            "etcd", lambda: _etcd_healthy(metrics_port), deadline, "etcd never reported itself healthy"
        )

    def _start_apiserver(self, pki: Pki, port: int, etcd_port: int, deadline: Deadline) -> None:
        argv = [
            str(self.bin_dir / "kube-apiserver"),
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            # Explicit, so the host's default route does not decide it. A loopback address is fine to advertise,
            # but Endpoints may not hold one, so the reconciler of Service "kubernetes"'s endpoints is off.
            "--advertise-address=127.0.0.1",
            "--endpoint-reconciler-type=none",
            f"--etcd-servers=https://127.0.0.1:{etcd_port}",
            f"--etcd-cafile={pki.ca.cert}",
            f"--etcd-certfile={pki.apiserver_etcd_client.cert}",
            f"--etcd-keyfile={pki.apiserver_etcd_client.key}",
            f"--tls-cert-file={pki.apiserver_serving.cert}",
            f"--tls-private-key-file={pki.apiserver_serving.key}",
            f"--client-ca-file={pki.ca.cert}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki.service_account_pub}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--cert-dir={self.work_dir / 'kube-apiserver-certs'}",  # never written (certificates are given)
            "--profiling=false",
            # pods/log goes to the node's kubelet endpoint; the lab's node has no resolvable host name
            "--kubelet-preferred-address-types=InternalIP",
            # logs and exec: the API server shows the kubelets a client certificate of the lab's CA
            f"--kubelet-client-certificate={pki.kubelet_client.cert}",
            f"--kubelet-client-key={pki.kubelet_client.key}",
        ]
        self.procs.spawn("kube-apiserver", argv)
        self._api_port = port
        _write_kubeconfig(self.kubeconfig, self.server, pki.ca.cert, pki.admin, certs.ADMIN_USER)
        context = _client_context(pki.ca.cert, pki.admin)
        self.procs.await_ready(
            "kube-apiserver",
            lambda: _https_ok(port, "/readyz", context),
            deadline,
            "kube-apiserver never became ready; the failing checks are in the last state",
        )

    def _start_controller_manager(self, pki: Pki, port: int, deadline: Deadline) -> None:
        extra = [
            f"--cert-dir={self.work_dir / 'kube-controller-manager-certs'}",
            f"--controllers={','.join(CONTROLLERS)}",
            # Each controller acts as its own service account: the role of system:kube-controller-manager alone
            # may not create ReplicaSets or Pods.
            "--use-service-account-credentials=true",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--root-ca-file={pki.ca.cert}",
        ]
        identity = pki.controller_manager
        self._start_secure("kube-controller-manager", identity, certs.CONTROLLER_MANAGER_USER, port, extra, deadline)

    def _start_scheduler(self, pki: Pki, port: int, deadline: Deadline) -> None:
        extra = ["--v=2"]  # one line per binding: where each pod went and why not elsewhere
        self._start_secure("kube-scheduler", pki.scheduler, certs.SCHEDULER_USER, port, extra, deadline)

    def _start_secure(
        self, name: str, identity: CertKey, user: str, port: int, extra: Sequence[str], deadline: Deadline
    ) -> None:
        """A component that talks to the API server as ``user`` and serves its health check on 127.0.0.1:``port``
        with the same certificate; returns once /healthz answers 200."""
        pki = self.pki
        kubeconfig = self.work_dir / f"{name}.kubeconfig"
        _write_kubeconfig(kubeconfig, self.server, pki.ca.cert, identity, user)
        argv = [
            str(self.bin_dir / name),
            f"--kubeconfig={kubeconfig}",
            f"--authentication-kubeconfig={kubeconfig}",
            f"--authorization-kubeconfig={kubeconfig}",
            f"--client-ca-file={pki.ca.cert}",
            # The client CA is given; looking it up in the cluster's extension-apiserver-authentication ConfigMap
            # would only log errors about the request-header CA this API server does not have.
            "--authentication-skip-lookup=true",
            "--bind-address=127.0.0.1",
            f"--secure-port={port}",
            f"--tls-cert-file={identity.cert}",
            f"--tls-private-key-file={identity.key}",
            "--leader-elect=false",
            "--profiling=false",
            *extra,
        ]
        self.procs.spawn(name, argv)
        context = _client_context(pki.ca.cert, pki.admin)
        self.procs.await_ready(
            name, lambda: _https_ok(port, "/healthz", context), deadline, f"{name} never reported itself healthy"
        )

    @property
    def pki(self) -> Pki:
        if self._pki is None:
            raise ControlPlaneError("the control plane has not been started; call start() first")
        return self._pki

    @property
    def server(self) -> str:
        """The API server's URL, as seen from this network namespace."""
        if self._api_port is None:
            raise ControlPlaneError("the control plane has not been started; call start() first")
        return f"https://127.0.0.1:{self._api_port}"

    @property
    def kubeconfig(self) -> Path:
        """The admin kubeconfig (user svctunnel-admin in group system:masters)."""
        return self.work_dir / "admin.kubeconfig"

    def api_client(self) -> client.ApiClient:
        """A new API client with admin rights; use it in ``with`` so its connections close."""
        if not self.kubeconfig.exists():
            raise ControlPlaneError(f"no admin kubeconfig at {self.kubeconfig}; call start() first")
        # the kubernetes package leaves this function unannotated
        api: client.ApiClient = config.new_client_from_config(config_file=str(self.kubeconfig))  # type: ignore[no-untyped-call]
        return api

    def api_server_in(self, netns: str) -> str:
        """The API server's URL as programs inside network namespace ``netns`` reach it: a forwarder on
        127.0.0.1 there (one per namespace, closed by ``stop()``)."""
        if self._api_port is None:
            raise ControlPlaneError("the control plane has not been started; call start() first")
        if not netns_mod.exists(netns):
            raise ControlPlaneError(f"network namespace {netns} does not exist; create it (and bring lo up) first")
        forwarder = self._forwarders.get(netns)
        if forwarder is None:
            forwarder = self._forwarders[netns] = NetnsForwarder(netns, ("127.0.0.1", self._api_port))
            forwarder.start()
        return f"https://127.0.0.1:{forwarder.port}"

    def write_kubeconfig(self, path: Path, server: str, identity: CertKey, user: str) -> None:
        """A kubeconfig for ``user`` (its certificate ``identity``) of the lab's CA, against ``server``."""
        _write_kubeconfig(path, server, self.pki.ca.cert, identity, user)

    # ---- kube-proxy in a node namespace ----

    def start_kube_proxy(
        self,
        netns: str,
        node_name: str,
        cluster_cidr: str,
        timeout: float = 60.0,
        node_port_addresses: Sequence[str] = (),
    ) -> None:
        """Run kube-proxy (nftables mode) inside network namespace ``netns`` as node ``node_name``.

        Returns once its health check answers 200 and its first sync has written table ``ip kube-proxy`` there.
        ``node_port_addresses`` empty keeps kube-proxy's default for nftables mode: the node's primary IP only."""
        component = _kube_proxy(netns)
        if component in self.procs:
            raise ControlPlaneError(f"{component} is already running; stop() the control plane first")
        pki, api_port = self._pki, self._api_port
        if pki is None or api_port is None:
            raise ControlPlaneError("the control plane has not been started; call start() first")
        if not netns_mod.exists(netns):
            raise ControlPlaneError(f"network namespace {netns} does not exist; create it (and bring lo up) first")
        deadline = Deadline.after(timeout)
        if netns not in self._proxy_netns:  # registered first: even a failed start may leave tables
            self._proxy_netns.append(netns)
        try:
            with self._timed(component):
                server = self.api_server_in(netns)
                directory = self.work_dir / component
                directory.mkdir(exist_ok=True)
                kubeconfig = directory / "kubeconfig"
                _write_kubeconfig(kubeconfig, server, pki.ca.cert, pki.kube_proxy, certs.KUBE_PROXY_USER)
                healthz, metrics = free_ports_in(netns, 2)
                settings = _kube_proxy_config(
                    kubeconfig, node_name, cluster_cidr, healthz, metrics, node_port_addresses
                )
                config_file = directory / "config.json"
                config_file.write_text(json.dumps(settings, indent=2) + "\n")
                self.procs.spawn(
                    component,
                    ["ip", "netns", "exec", netns, str(self.bin_dir / "kube-proxy"), "--config", str(config_file)],
                )
                self.procs.await_ready(
                    component,
                    lambda: _kube_proxy_ready(netns, healthz),
                    deadline,
                    f"kube-proxy never synced; does Node {node_name} exist with an InternalIP (create_node)?",
                )
        except BaseException as exc:
            problems = self._stop_kube_proxies([netns], Deadline.after(STOP_GRACE_S + KILL_GRACE_S + 5.0))
            if problems:
                raise ControlPlaneError(f"cleaning up after a failed kube-proxy start: {'; '.join(problems)}") from exc
            raise

    # ---- stopping ----

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every process started here, close the forwarders and remove kube-proxy's nftables tables.

        Clients go first (kube-proxy, kube-controller-manager), then kube-apiserver, then etcd. Safe to call twice
        and after a partial start; raises only if something could not be undone, after trying everything."""
        deadline = Deadline.after(timeout)
        problems = self._stop_kube_proxies(
            list(self._proxy_netns), deadline, also=["kube-scheduler", "kube-controller-manager"]
        )
        problems += self._close_forwarders(deadline)
        problems += self.procs.terminate(["kube-apiserver"], deadline)
        problems += self.procs.terminate(["etcd"], deadline)
        problems += self.procs.terminate(self.procs.names, deadline)  # anything a future phase adds
        if not self.procs.names:
            self._api_port = None
        if problems:
            raise ControlPlaneError(f"stopping the control plane: {'; '.join(problems)}")

    def _stop_kube_proxies(self, namespaces: list[str], deadline: Deadline, also: Sequence[str] = ()) -> list[str]:
        problems = self.procs.terminate([*map(_kube_proxy, namespaces), *also], deadline)
        for netns in namespaces:
            if _kube_proxy(netns) in self.procs:
                continue  # still running: removing its tables now would only race with it
            problems += _delete_kube_proxy_tables(netns)
            self._proxy_netns.remove(netns)
        return problems

    def _close_forwarders(self, deadline: Deadline) -> list[str]:
        problems = []
        for netns in list(self._forwarders):
            try:
                self._forwarders.pop(netns).close(min(5.0, deadline.remaining()))
            except LabError as exc:
                problems.append(str(exc))
        return problems

    # ---- timings, pausing, logs ----

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:
            self.timings[phase] = time.monotonic() - started

    @contextlib.contextmanager
    def paused(self, component: str) -> Iterator[None]:
        """``component`` stopped with SIGSTOP (it keeps its sockets but answers nothing) until the block ends."""
        with self.procs.paused(component):
            yield

    def log_path(self, component: str) -> Path:
        """Where ``component`` (etcd, kube-apiserver, kube-controller-manager, kube-proxy-<netns>) logs."""
        return self.procs.log_path(component)


def _kube_proxy(netns: str) -> str:
    return f"kube-proxy-{netns}"


def _kube_proxy_config(
    kubeconfig: Path,
    node_name: str,
    cluster_cidr: str,
    healthz_port: int,
    metrics_port: int,
    node_port_addresses: Sequence[str],
) -> dict[str, object]:
    """A KubeProxyConfiguration (v1alpha1) for one lab node; JSON is valid YAML, which kube-proxy reads."""
    settings: dict[str, object] = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "nftables",
        "hostnameOverride": node_name,
        "clusterCIDR": cluster_cidr,
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "healthzBindAddress": f"127.0.0.1:{healthz_port}",
        "metricsBindAddress": f"127.0.0.1:{metrics_port}",
        # Zero means "leave the kernel's value": conntrack sizes and timeouts are global sysctls, not the lab's.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
        "oomScoreAdj": 0,  # the default, -999, would make the test's kube-proxy the last thing the OOM killer takes
    }
    if node_port_addresses:
        settings["nodePortAddresses"] = list(node_port_addresses)
    return settings


def _kube_proxy_ready(netns: str, healthz_port: int) -> tuple[bool, str]:
    """Healthy (it sees its Node) and synced once: its first sync writes the whole ``ip kube-proxy`` table."""
    health = _get(_NetnsHTTPConnection(netns, healthz_port), "/healthz")
    try:
        listing = netns_mod.run(netns, [nft.nft_binary(), "list", "tables"], check=False)
    except SvcTunnelError as exc:
        listing = f"(nft list tables failed: {exc})"
    tables = [line.strip() for line in listing.splitlines() if line.strip()]
    synced = "table ip kube-proxy" in tables
    state = f"GET /healthz in {netns}: {health}; nftables tables there: {', '.join(tables) or 'none'}"
    return health.startswith("200") and synced, state


def _delete_kube_proxy_tables(netns: str) -> list[str]:
    if not netns_mod.exists(netns):
        return []  # its tables went with it
    problems = []
    for family, table in KUBE_PROXY_TABLES:
        try:
            nft.delete_table(family, table, netns)
        except SvcTunnelError as exc:
            problems.append(str(exc))
    return problems


def _etcd_healthy(metrics_port: int) -> tuple[bool, str]:
    status = _get(http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=_PROBE_TIMEOUT_S), "/health")
    return status.startswith("200") and '"health":"true"' in status, f"GET /health: {status}"


def _https_ok(port: int, path: str, context: ssl.SSLContext) -> tuple[bool, str]:
    status = _get(http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=_PROBE_TIMEOUT_S), path)
    return status.startswith("200"), f"GET {path}: {status}"


def _get(conn: http.client.HTTPConnection, path: str) -> str:
    """'<status> <body>' of a GET (the body trimmed to its failing checks when long), or the error."""
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read(16384).decode(errors="replace")
    except (OSError, http.client.HTTPException, LabError) as exc:
        return f"no answer ({exc or type(exc).__name__})"
    finally:
        conn.close()
    lines = [line for line in body.splitlines() if line.strip()]
    failing = [line for line in lines if line.startswith("[-]")]
    return f"{response.status} {' '.join(failing or lines)[:400]}"


class _NetnsHTTPConnection(http.client.HTTPConnection):
    """Plain HTTP to 127.0.0.1:``port`` inside another network namespace."""

    def __init__(self, netns: str, port: int) -> None:
        super().__init__("127.0.0.1", port, timeout=_PROBE_TIMEOUT_S)
        self._netns = netns

    def connect(self) -> None:
        sock = socket_in_netns(self._netns)
        sock.settimeout(self.timeout)
        try:
            sock.connect((self.host, self.port))
        except OSError:
            sock.close()
            raise
        self.sock = sock


def _client_context(ca: Path, identity: CertKey) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(str(identity.cert), str(identity.key))
    return context


def _write_kubeconfig(path: Path, server: str, ca: Path, identity: CertKey, user: str) -> None:
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "svctunnel-lab", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(identity.cert), "client-key": str(identity.key)}}],
        "contexts": [{"name": "svctunnel-lab", "context": {"cluster": "svctunnel-lab", "user": user}}],
        "current-context": "svctunnel-lab",
    }
    path.write_text(json.dumps(kubeconfig, indent=2) + "\n")


def _free_loopback_ports(count: int) -> list[int]:
    """``count`` different TCP ports free on 127.0.0.1 here (another process may still take one before us)."""
    probes = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()
