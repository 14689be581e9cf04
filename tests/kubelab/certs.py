"""The lab control plane's certificates and keys, made with the ``openssl`` CLI (3.0 or newer).

One throw-away CA signs everything. Keys are EC P-256 (fast to make, and every component accepts them), except the
service-account signing key, which is RSA 2048. Certificates are valid for a short time only: a lab lives for one
test session.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pytest_svctunnel.errors import LabError

ADMIN_USER = "svctunnel-admin"
ADMIN_GROUP = "system:masters"  # bound to cluster-admin by the default RBAC policy
CONTROLLER_MANAGER_USER = "system:kube-controller-manager"
KUBE_PROXY_USER = "system:kube-proxy"  # the default RBAC binds ClusterRole system:node-proxier to this user
SCHEDULER_USER = "system:kube-scheduler"  # bound to ClusterRole system:kube-scheduler by the default RBAC
NODES_GROUP = "system:nodes"  # with user system:node:<name>: what the Node authorizer and NodeRestriction know
VALID_DAYS = 2
_OPENSSL_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class CertKey:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    """Every file the control plane's components and clients need."""

    ca: CertKey
    etcd_server: CertKey
    apiserver_serving: CertKey
    apiserver_etcd_client: CertKey
    admin: CertKey
    controller_manager: CertKey  # a client certificate that also serves the controller manager's secure port
    kube_proxy: CertKey
    scheduler: CertKey  # a client certificate that also serves the scheduler's secure port
    kubelet_client: CertKey  # the API server's identity towards the kubelets (logs, exec)
    nodes: dict[str, CertKey]  # each kubelet's client certificate, by node name
    service_account_key: Path
    service_account_pub: Path

    def node(self, name: str) -> CertKey:
        if name not in self.nodes:
            raise LabError(f"no certificate for node {name}; name it in the control plane's node_names")
        return self.nodes[name]


@dataclass(frozen=True)
class _Leaf:
    name: str
    subject: str
    usages: tuple[str, ...]  # extended key usages: serverAuth, clientAuth
    sans: tuple[str, ...] = ()


def node_user(name: str) -> str:
    return f"system:node:{name}"


def generate(directory: Path, service_ip: str, node_names: Sequence[str] = (), days: int = VALID_DAYS) -> Pki:
    """Make a fresh CA, the leaf certificates and the service-account key pair in ``directory``.

    ``service_ip`` is the first address of the service range: the ``kubernetes`` Service's ClusterIP, which the
    API server's certificate must name; ``node_names`` get a kubelet client certificate each. Files of an earlier
    call are overwritten.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = _self_signed_ca(directory, days)
    leaves = {
        leaf.name: _signed_leaf(directory, ca, leaf, days)
        for leaf in (
            _Leaf("etcd-server", "/CN=svctunnel-etcd", ("serverAuth",), ("IP:127.0.0.1", "DNS:localhost")),
            _Leaf("apiserver", "/CN=kube-apiserver", ("serverAuth",), _apiserver_sans(service_ip)),
            _Leaf("apiserver-etcd-client", "/CN=kube-apiserver-etcd-client", ("clientAuth",)),
            _Leaf("admin", f"/O={ADMIN_GROUP}/CN={ADMIN_USER}", ("clientAuth",)),
            _Leaf(
                "kube-controller-manager",
                f"/CN={CONTROLLER_MANAGER_USER}",
                ("clientAuth", "serverAuth"),
                ("IP:127.0.0.1", "DNS:localhost"),
            ),
            _Leaf("kube-proxy", f"/CN={KUBE_PROXY_USER}", ("clientAuth",)),
            _Leaf(
                "kube-scheduler",
                f"/CN={SCHEDULER_USER}",
                ("clientAuth", "serverAuth"),
                ("IP:127.0.0.1", "DNS:localhost"),
            ),
            _Leaf("apiserver-kubelet-client", f"/O={ADMIN_GROUP}/CN=kube-apiserver-kubelet-client", ("clientAuth",)),
            *(_Leaf(f"node-{name}", f"/O={NODES_GROUP}/CN={node_user(name)}", ("clientAuth",)) for name in node_names),
        )
    }
    sa_key, sa_pub = _service_account_keys(directory)
    return Pki(
        ca=ca,
        etcd_server=leaves["etcd-server"],
        apiserver_serving=leaves["apiserver"],
        apiserver_etcd_client=leaves["apiserver-etcd-client"],
        admin=leaves["admin"],
        controller_manager=leaves["kube-controller-manager"],
        kube_proxy=leaves["kube-proxy"],
        scheduler=leaves["kube-scheduler"],
        kubelet_client=leaves["apiserver-kubelet-client"],
        nodes={name: leaves[f"node-{name}"] for name in node_names},
        service_account_key=sa_key,
        service_account_pub=sa_pub,
    )


def _apiserver_sans(service_ip: str) -> tuple[str, ...]:
    names = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc")
    return ("IP:127.0.0.1", f"IP:{service_ip}", *(f"DNS:{name}" for name in names))


def _self_signed_ca(directory: Path, days: int) -> CertKey:
    pair = CertKey(directory / "ca.crt", directory / "ca.key")
    extensions = ["basicConstraints = critical, CA:TRUE", "keyUsage = critical, keyCertSign, cRLSign, digitalSignature"]
    _request(directory, "ca", "/CN=svctunnel-lab-ca", extensions, pair, days, signer=None)
    return pair


def _signed_leaf(directory: Path, ca: CertKey, leaf: _Leaf, days: int) -> CertKey:
    pair = CertKey(directory / f"{leaf.name}.crt", directory / f"{leaf.name}.key")
    extensions = [
        "basicConstraints = critical, CA:FALSE",
        "keyUsage = critical, digitalSignature",
        f"extendedKeyUsage = {', '.join(leaf.usages)}",
    ]
    if leaf.sans:
        extensions.append(f"subjectAltName = {', '.join(leaf.sans)}")
    _request(directory, leaf.name, leaf.subject, extensions, pair, days, signer=ca)
    return pair


def _request(
    directory: Path, name: str, subject: str, extensions: list[str], pair: CertKey, days: int, signer: CertKey | None
) -> None:
    """One ``openssl req -x509`` run: a new P-256 key and its certificate, self-signed or signed by ``signer``.

    A config file of our own keeps the host's openssl.cnf (and its default extensions) out of it."""
    config = directory / f"{name}.cnf"
    config.write_text("[req]\ndistinguished_name = dn\n[dn]\n[ext]\n" + "\n".join(extensions) + "\n")
    argv = ["req", "-x509", "-new", "-config", str(config), "-extensions", "ext", "-subj", subject]
    argv += ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc", "-days", str(days)]
    argv += ["-keyout", str(pair.key), "-out", str(pair.cert)]
    if signer is not None:
        argv += ["-CA", str(signer.cert), "-CAkey", str(signer.key)]
    _openssl(argv, what=f"the {name} certificate")


def _service_account_keys(directory: Path) -> tuple[Path, Path]:
    key, pub = directory / "service-account.key", directory / "service-account.pub"
    _openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", str(key)], "the SA key")
    _openssl(["pkey", "-in", str(key), "-pubout", "-out", str(pub)], what="the service-account public key")
    return key, pub


def _openssl(argv: list[str], what: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise LabError("the 'openssl' command is missing; install OpenSSL 3 (Debian/Ubuntu: apt-get install openssl)")
    try:
        done = subprocess.run([binary, *argv], capture_output=True, text=True, timeout=_OPENSSL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise LabError(f"openssl did not make {what} within {_OPENSSL_TIMEOUT_S:g} s") from None
    if done.returncode != 0:
        raise LabError(
            f"openssl failed to make {what} ({done.returncode}): {done.stderr.strip()}; "
            "the lab needs OpenSSL 3.0 or newer ('openssl req -x509 -CA')"
        )
