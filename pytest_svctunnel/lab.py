"""The built-in lab: the path a tunnel takes into a real cluster, in network namespaces.

    this namespace (external host)
      | svt<id>-lan                 198.18.K.0/30    fd5e:c7:K:1::/64
    home router  (masquerade; rewrites source ports unless told not to)
      | wan                         198.18.K.4/30    fd5e:c7:K:2::/64
    WAN router   (routes the load-balancer address to the node)
      | node                        198.18.K.8/30    fd5e:c7:K:3::/64
    node         (kube-proxy: DNAT LB:port -> pod:port, source kept;
      |           CNI: masquerade pod egress to the node address)
      | pod                         198.18.K.12/30   fd5e:c7:K:4::/64
    pod          (runs `svctunnel agent`)

K is a per-run block, so two labs can live side by side. Every namespace and
root-namespace link is named with the run id, and ``down`` removes them all.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from . import device, names, netns, nft
from .agentsettings import AgentSettings
from .hostobjects import remove_run_objects
from .labagent import LabAgent
from .protocol import DEFAULT_PORT, Endpoint
from .runs import Run, all_runs
from .shield import shield
from .values import IPAddress
from .waiting import Deadline

ROLES = ("home", "wan", "node", "pod")
_LAB_FILE = "lab.json"
NAT_PORTS = (20000, 29999)
_FORWARDING = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}
NO_DAD = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}


@dataclass(frozen=True)
class LabPlan:
    """Names and addresses of one lab, derived from the run id and its block K."""

    run_id: str
    block: int
    port: int = DEFAULT_PORT
    rewrite_ports: bool = True

    def ns(self, role: str) -> str:
        return names.netns_name(self.run_id, role)

    @property
    def lan_link(self) -> str:
        return names.link_name(self.run_id, "lan")

    def v4(self, host: int) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(f"198.18.{self.block}.{host}")

    def v6(self, segment: int, host: int) -> ipaddress.IPv6Address:
        return ipaddress.IPv6Address(f"fd5e:c7:{self.block:x}:{segment:x}::{host:x}")

    def address(self, version: int, segment: int, host: int) -> IPAddress:
        """Segment 1..4 (lan, wan, node, pod); host 1 or 2 within it."""
        return self.v4(4 * (segment - 1) + host) if version == 4 else self.v6(segment, host)

    def segment(self, version: int, segment: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(f"{self.address(version, segment, 0)}/{self.prefix(version)}")

    def prefix(self, version: int) -> int:
        return 30 if version == 4 else 64

    def service(self, version: int = 4) -> Endpoint:
        """The load-balancer address and port of the tunnel's Service."""
        address = self.v4(100) if version == 4 else self.v6(0xFF, 0x100)
        return Endpoint(address, self.port)

    def pod_address(self, version: int) -> IPAddress:
        return self.address(version, 4, 2)

    def public_address(self, version: int) -> IPAddress:
        """The home router's WAN address: what the pod sees as the external end's address."""
        return self.address(version, 2, 1)

    def external_address(self, version: int) -> IPAddress:
        return self.address(version, 1, 2)


# (namespace role or None for this one, its device, peer role, peer device, segment, host, peer host)
def _links(plan: LabPlan) -> list[tuple[str | None, str, str, str, int, int, int]]:
    return [
        (None, plan.lan_link, "home", "lan", 1, 2, 1),
        ("home", "wan", "wan", "home", 2, 1, 2),
        ("wan", "node", "node", "wan", 3, 1, 2),
        ("node", "pod", "pod", "eth0", 4, 1, 2),
    ]


def _routes(plan: LabPlan, version: int) -> list[tuple[str | None, str, IPAddress]]:
    """(namespace role, destination, gateway) for every static route."""
    default = "0.0.0.0/0" if version == 4 else "::/0"
    service = f"{plan.service(version).address}/{32 if version == 4 else 128}"
    return [
        (None, service, plan.address(version, 1, 1)),
        ("home", default, plan.address(version, 2, 2)),
        ("wan", service, plan.address(version, 3, 2)),
        ("node", default, plan.address(version, 3, 1)),
        ("pod", default, plan.address(version, 4, 1)),
    ]


def home_rules(plan: LabPlan, nat_ports: tuple[int, int] = NAT_PORTS) -> str:
    ports = f" to :{nat_ports[0]}-{nat_ports[1]} random" if plan.rewrite_ports else ""
    l4 = "meta l4proto { tcp, udp } " if plan.rewrite_ports else ""
    body = (
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        f'    oifname "wan" {l4}masquerade{ports}\n'
        + ('    oifname "wan" masquerade\n' if plan.rewrite_ports else "")
        + "  }"
    )
    return nft.replace_table("inet", "svtlab", body)


def node_rules(plan: LabPlan) -> str:
    """What kube-proxy programs for a UDP LoadBalancer Service with externalTrafficPolicy
    Local (DNAT to the local endpoint, source kept), and what a CNI does for pod egress."""
    lines = []
    for version, ip in ((4, "ip"), (6, "ip6")):
        svc = plan.service(version)
        pod = plan.pod_address(version)
        target = f"{pod}:{plan.port}" if version == 4 else f"[{pod}]:{plan.port}"
        lines.append(f"    {ip} daddr {svc.address} udp dport {svc.port} dnat {ip} to {target}")
    pre = "\n".join(lines)
    post = "\n".join(
        f'    oifname "wan" {ip} saddr {plan.segment(v, 4)} masquerade' for v, ip in ((4, "ip"), (6, "ip6"))
    )
    body = (
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n"
        f"{pre}\n  }}\n"
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        f"{post}\n  }}"
    )
    return nft.replace_table("inet", "svtlab", body)


def pick_block(run_id: str) -> int:
    """A block no other lab uses: not one of this state root's runs, nor one whose addresses
    exist on this host already (a lab of another state root, another user or test session)."""
    used = _blocks_on_this_host()
    for run in all_runs():
        data = run.read(_LAB_FILE)
        if data and run.id != run_id:
            used.add(int(data["block"]))
    block = 1 + int(run_id, 16) % 250
    while block in used:
        block = block % 250 + 1
    return block


def _blocks_on_this_host() -> set[int]:
    """Every K of a 198.18.K.x address in this namespace."""
    with device.netlink(None) as ipr:
        addresses = [str(msg.get_attr("IFA_ADDRESS")) for msg in ipr.get_addr(family=socket.AF_INET)]
    return {int(a.split(".")[2]) for a in addresses if a.startswith("198.18.")}


class Lab:
    """A lab of one run: ``up`` builds it, ``start_agent`` runs the pod end, ``down`` removes all.

    Works without pytest; ``svctunnel lab`` and the plugin's lab backend both use it.
    """

    def __init__(self, run: Run, port: int = DEFAULT_PORT, rewrite_ports: bool = True) -> None:
        self.run = run
        saved = run.read(_LAB_FILE)
        if saved:
            self.plan = LabPlan(run.id, int(saved["block"]), int(saved["port"]), bool(saved["rewrite_ports"]))
        else:
            self.plan = LabPlan(run.id, pick_block(run.id), port, rewrite_ports)
        self.agent = LabAgent(run, self.plan.ns("pod"))

    # -- building --------------------------------------------------------------

    def up(self, timeout: float = 60.0) -> None:
        """Build the topology; on any failure, remove what was built and re-raise."""
        with ExitStack() as undo:
            undo.callback(self.down, timeout)
            self._save()
            for role in ROLES:
                netns.create(self.plan.ns(role))
                netns.sysctl(self.plan.ns(role), NO_DAD)
            for role in ("home", "wan", "node"):
                netns.sysctl(self.plan.ns(role), _FORWARDING)
            self._wire()
            nft.apply(home_rules(self.plan), self.plan.ns("home"))
            nft.apply(node_rules(self.plan), self.plan.ns("node"))
            undo.pop_all()

    def _save(self) -> None:
        p = self.plan
        self.run.write(_LAB_FILE, {"block": p.block, "port": p.port, "rewrite_ports": p.rewrite_ports})

    def _role_ns(self, role: str | None) -> str | None:
        return self.plan.ns(role) if role else None

    def _wire(self) -> None:
        for role, dev, peer_role, peer_dev, segment, host, peer_host in _links(self.plan):
            with device.netlink(self._role_ns(role)) as ipr:
                ipr.link(
                    "add", ifname=dev, kind="veth", peer={"ifname": peer_dev, "net_ns_fd": self.plan.ns(peer_role)}
                )
            if role is None:
                Path(f"/proc/sys/net/ipv6/conf/{dev}/accept_dad").write_text("0")
            self._address(role, dev, segment, host)
            self._address(peer_role, peer_dev, segment, peer_host)
        for version in (4, 6):
            for role, destination, gateway in _routes(self.plan, version):
                with device.netlink(self._role_ns(role)) as ipr:
                    ipr.route("add", dst=destination, gateway=str(gateway))

    def _address(self, role: str | None, dev: str, segment: int, host: int) -> None:
        with device.netlink(self._role_ns(role)) as ipr:
            index = ipr.link_lookup(ifname=dev)[0]
            for version in (4, 6):
                address = self.plan.address(version, segment, host)
                ipr.addr(
                    "add",
                    index=index,
                    address=str(address),
                    prefixlen=self.plan.prefix(version),
                    flags=device.IFA_F_NODAD if version == 6 else 0,
                )
            ipr.link("set", index=index, state="up")
            if role is not None:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")

    # -- the pod end -------------------------------------------------------------

    def start_agent(
        self, key: bytes, peer: IPAddress | None = None, timeout: float = 30.0, shared_netns: bool = False
    ) -> LabAgent:
        """Start ``svctunnel agent`` in the pod namespace with ``key`` (written to ``agent.key_file``)
        on the lab's port; returns once it listens. ``shared_netns``: as if injected into an application's pod."""
        self.agent.start(AgentSettings(key=key, port=self.plan.port, peer=peer, shared_netns=shared_netns), timeout)
        return self.agent

    def stop_agent(self, timeout: float = 10.0) -> None:
        self.agent.stop(timeout)

    def log_text(self) -> str:
        return self.agent.log_text()

    def log_tail(self, lines: int = 40) -> str:
        return self.agent.log_tail(lines)

    # -- removal and inspection ---------------------------------------------------

    def down(self, timeout: float = 30.0) -> None:
        """Stop the agent and anything else running in the lab, remove every namespace and link of
        the run, and wait until gone. SIGINT, SIGTERM and SIGALRM wait until this is done."""
        with shield():
            remove_run_objects(self.run, Deadline.after(timeout), self.agent)

    def exists(self) -> bool:
        return any(netns.exists(self.plan.ns(r)) for r in ROLES)

    def conntrack(self, role: str) -> str:
        """The UDP conntrack table of one namespace (needs the conntrack tool)."""
        return netns.run(self.plan.ns(role), ["conntrack", "-L", "-p", "udp"], check=False)

    def link_report(self, role: str) -> str:
        """Link state and counters of the VXLAN devices in one lab namespace."""
        with device.netlink(self.plan.ns(role)) as ipr:
            tunnels = [
                str(link.get_attr("IFLA_IFNAME")) for link in ipr.get_links() if device.link_kind(link) == "vxlan"
            ]
        states = [device.link_state(self.plan.ns(role), name) for name in tunnels]
        return "\n".join(s.render() for s in states if s) or "(no tunnel devices)"

    def status(self) -> str:
        p = self.plan
        pid = self.agent.pid
        lines = [
            f"run {p.run_id}: block {p.block}, namespaces "
            + ", ".join(f"{p.ns(r)}{'' if netns.exists(p.ns(r)) else ' (missing)'}" for r in ROLES),
            f"service {p.service(4)} and {p.service(6)}; pod {p.pod_address(4)}; "
            f"home router WAN {p.public_address(4)} ({'rewrites ports' if p.rewrite_ports else 'keeps ports'})",
            f"agent pid {pid if self.agent.alive() else '-'}; log {self.agent.log_path}",
        ]
        return "\n".join(lines)


def lab_runs() -> Iterator[Run]:
    """Runs that have a lab description in their state directory."""
    return (run for run in all_runs() if run.read(_LAB_FILE) is not None)
