"""The network a test cluster sits in: the built-in lab's path, with a Kubernetes node at its end.

    this namespace (external host, runs pytest and the external end)
      | svt<id>-lan              198.18.K.0/30
    home router  (masquerade, rewrites source ports)
      | wan                      198.18.K.4/30
    WAN router   (routes the load-balancer pool to the node)
      | node                     198.18.K.8/30     node address 198.18.K.10
    node         (kube-proxy's own rules; the CNI role: masquerade pod egress)
      | p<n> ... pods            198.18.K.64/26, one /30 and one /64 per pod (made by the kubelet)

Names carry the run id (``pytest_svctunnel.names``), so ``hostobjects.remove_run_objects``
removes all of it (the kubelet's pod namespaces too) and the session's leak check sees any
leftovers.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from pytest_svctunnel import device, names, netns, nft
from pytest_svctunnel.hostobjects import remove_run_objects
from pytest_svctunnel.lab import NO_DAD, LabPlan, pick_block
from pytest_svctunnel.runs import Run
from pytest_svctunnel.waiting import Deadline

ROLES = ("home", "wan", "node")
_FORWARDING = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"}


@dataclass(frozen=True)
class ClusterPlan:
    """Addresses of one test cluster's network, from the lab's plan."""

    lab: LabPlan

    @property
    def node_netns(self) -> str:
        return self.lab.ns("node")

    @property
    def pod_prefix(self) -> str:
        return names.netns_name(self.lab.run_id, "pod")

    @property
    def node_address(self) -> ipaddress.IPv4Address:
        return self.lab.v4(10)

    @property
    def pod_cidr_v4(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"198.18.{self.lab.block}.64/26")

    @property
    def pod_cidr_v6(self) -> ipaddress.IPv6Network:
        return ipaddress.IPv6Network(f"fd5e:c7:{self.lab.block:x}:40::/58")

    @property
    def lb_pool(self) -> list[ipaddress.IPv4Address]:
        return [self.lab.v4(host) for host in range(100, 108)]

    @property
    def lb_net(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(f"198.18.{self.lab.block}.96/28")


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
            self._link("wan", "node", "node", "wan", 3, 1, 2)
            self._routes()
            nft.apply(_home_rules(), lab.ns("home"))
            nft.apply(self._node_rules(), lab.ns("node"))
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
        routes: list[tuple[str | None, str, str]] = [
            (None, str(plan.lb_net), str(lab.address(4, 1, 1))),
            (None, f"{plan.node_address}/32", str(lab.address(4, 1, 1))),
            ("home", "0.0.0.0/0", str(lab.address(4, 2, 2))),
            ("home", "::/0", str(lab.address(6, 2, 2))),
            ("wan", str(plan.lb_net), str(lab.address(4, 3, 2))),
            ("node", "0.0.0.0/0", str(lab.address(4, 3, 1))),
            ("node", "::/0", str(lab.address(6, 3, 1))),
        ]
        for role, destination, gateway in routes:
            with device.netlink(lab.ns(role) if role else None) as ipr:
                ipr.route("add", dst=destination, gateway=gateway)

    def _node_rules(self) -> str:
        """The CNI's part: pods reach the outside world masqueraded to the node address."""
        body = (
            "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "wan" ip saddr {self.plan.pod_cidr_v4} masquerade\n'
            f'    oifname "wan" ip6 saddr {self.plan.pod_cidr_v6} masquerade\n'
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
