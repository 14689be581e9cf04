"""The network a test cluster sits in: the built-in lab's path, with two Kubernetes nodes at its end.

    this namespace (external host, runs pytest and the external end)
      | svt<id>-lan              198.18.K.0/30
    home router  (masquerade, rewrites source ports)
      | wan                      198.18.K.4/30
    WAN router   (the load balancer's routes: a Service's address to the nodes that pass its health check,
      |           or in proxy mode to the Service's proxy namespace svt-<id>-lbN, veth lbN, see ``lbproxy``)
      | node                     198.18.K.8/30     node  svt-<id>-node   198.18.K.10, pods 198.18.K.128/26
      | node2                    198.18.K.12/30    node  svt-<id>-node2  198.18.K.14, pods 198.18.K.192/26
    nodes        (containerd, kubelet, kube-proxy; pods on a CNI bridge, their egress masqueraded)

Names carry the run id (``pytest_svctunnel.names``), so ``hostobjects.remove_run_objects``
removes all of it and the session's leak check sees any leftovers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pytest_svctunnel import device, netns, nft
from pytest_svctunnel.hostobjects import remove_run_objects
from pytest_svctunnel.lab import NO_DAD, LabPlan, pick_block
from pytest_svctunnel.runs import Run
from pytest_svctunnel.waiting import Deadline

from .node import NodeSpec

NODE_ROLES = ("node", "node2")
ROLES = ("home", "wan", *NODE_ROLES)
_FORWARDING = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}


@dataclass(frozen=True)
class ClusterPlan:
    """Addresses of one test cluster's network, from the lab's plan."""

    lab: LabPlan

    @property
    def nodes(self) -> list[NodeSpec]:
        """The worker nodes; each one's name is its network namespace's."""
        return [
            NodeSpec(
                self.lab.ns(role),
                self.node_address(i),
                ipaddress.IPv4Network(f"198.18.{self.lab.block}.{128 + 64 * i}/26"),
            )
            for i, role in enumerate(NODE_ROLES)
        ]

    def node_address(self, index: int) -> ipaddress.IPv4Address:
        return ipaddress.IPv4Address(self.lab.address(4, 3 + index, 2))

    def router_side(self, index: int, version: int = 4) -> str:
        """The WAN router's address towards node ``index``."""
        return str(self.lab.address(version, 3 + index, 1))

    @property
    def cluster_cidr(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"198.18.{self.lab.block}.128/25")

    @property
    def lb_pool(self) -> list[ipaddress.IPv4Address]:
        """The load balancer's addresses in routed mode (MetalLB's L2 mode)."""
        return [self.lab.v4(host) for host in range(100, 108)]

    @property
    def lb_proxy_pool(self) -> list[ipaddress.IPv4Address]:
        """Its addresses in proxy mode (cloud-provider-kind's proxies): each one a proxy namespace's."""
        return [self.lab.v4(host) for host in range(112, 120)]

    @property
    def lb_net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"198.18.{self.lab.block}.96/27")


class ClusterNetwork:
    """Builds and removes the cluster's network namespaces, links, routes and NAT."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.plan = ClusterPlan(LabPlan(run.id, pick_block(run.id)))
        self.run.write("lab.json", {"block": self.plan.lab.block, "port": 0, "rewrite_ports": True})

    def up(self) -> None:
        lab = self.plan.lab
        try:
            for role in ROLES:
                netns.create(lab.ns(role))
                netns.sysctl(lab.ns(role), {**NO_DAD, **_FORWARDING})
            self._link(None, lab.lan_link, "home", "lan", 1, 2, 1)
            self._link("home", "wan", "wan", "home", 2, 1, 2)
            for index, role in enumerate(NODE_ROLES):
                self._link("wan", role, role, "wan", 3 + index, 1, 2)
            self._routes()
            nft.apply(_home_rules(), lab.ns("home"))
            for node in self.plan.nodes:
                nft.apply(self._node_rules(node), node.netns)
        except BaseException:
            self.down(Deadline.after(30))
            raise

    def _link(
        self, role: str | None, dev: str, peer_role: str, peer_dev: str, segment: int, host: int, peer: int
    ) -> None:
        lab = self.plan.lab
        with device.netlink(lab.ns(role) if role else None) as ipr:
            ipr.link("add", ifname=dev, kind="veth", peer={"ifname": peer_dev, "net_ns_fd": lab.ns(peer_role)})
        if role is None:
            Path(f"/proc/sys/net/ipv6/conf/{dev}/accept_dad").write_text("0")
        for side, name, number in ((role, dev, host), (peer_role, peer_dev, peer)):
            with device.netlink(lab.ns(side) if side else None) as ipr:
                index = ipr.link_lookup(ifname=name)[0]
                for version in (4, 6):
                    address = lab.address(version, segment, number)
                    flags = device.IFA_F_NODAD if version == 6 else 0
                    ipr.addr("add", index=index, address=str(address), prefixlen=lab.prefix(version), flags=flags)
                ipr.link("set", index=index, state="up")
                if side is not None:
                    ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def _routes(self) -> None:
        lab, plan = self.plan.lab, self.plan
        home = str(lab.address(4, 1, 1))
        routes: list[tuple[str | None, str, str]] = [
            (None, str(plan.lb_net), home),
            ("home", "0.0.0.0/0", str(lab.address(4, 2, 2))),
            ("home", "::/0", str(lab.address(6, 2, 2))),
        ]
        for index, (role, node) in enumerate(zip(NODE_ROLES, plan.nodes, strict=True)):
            routes += [
                (None, f"{node.address}/32", home),
                ("wan", str(node.pod_cidr), str(node.address)),
                (role, "0.0.0.0/0", plan.router_side(index)),
                (role, "::/0", plan.router_side(index, 6)),
            ]
        for role, destination, gateway in routes:
            with device.netlink(lab.ns(role) if role else None) as ipr:
                ipr.route("add", dst=destination, gateway=gateway)

    def _node_rules(self, node: NodeSpec) -> str:
        """The CNI's part: pods reach the world outside the cluster masqueraded to the node address."""
        body = (
            "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "wan" ip saddr {node.pod_cidr} ip daddr != {self.plan.cluster_cidr} masquerade\n'
            "  }"
        )
        return nft.replace_table("inet", "svtcni", body)

    def down(self, deadline: Deadline) -> None:
        """Everything named with the run id: namespaces (also the pods'), links, processes in them."""
        remove_run_objects(self.run, deadline)


def _home_rules() -> str:
    body = (
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        '    oifname "wan" meta l4proto { tcp, udp } masquerade to :20000-29999 random\n'
        '    oifname "wan" masquerade\n'
        "  }"
    )
    return nft.replace_table("inet", "svtlab", body)
