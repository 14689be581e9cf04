"""Test aid: faults a real cluster path suffers, injected into a lab (the recovery tests, the soak).

Each function causes one fault and returns once it is in place; none of them touches
either tunnel end's configuration, so whatever heals afterwards healed on its own.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys

from pytest_svctunnel import device, netns, nft
from pytest_svctunnel.lab import NO_DAD, Lab, home_rules
from pytest_svctunnel.waiting import Deadline, wait_for


def flush_conntrack(lab: Lab, role: str) -> None:
    """Forget every connection-tracking entry of one lab namespace (node or home router)."""
    netns.run(lab.plan.ns(role), ["conntrack", "-F"], check=False)


def rebind_home_nat(lab: Lab, nat_ports: tuple[int, int]) -> None:
    """The home router forgets its mappings and hands out ports from another range."""
    nft.apply(home_rules(lab.plan, nat_ports), lab.plan.ns("home"))
    flush_conntrack(lab, "home")


def kill_agent(lab: Lab) -> None:
    """SIGKILL: the agent gets no chance to clean up."""
    pid = lab.agent.pid
    if pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if lab.agent.proc is not None:
        lab.agent.proc.wait(10)


def restart_pod(lab: Lab, key: bytes, timeout: float = 30.0) -> None:
    """What a pod restart does: the agent dies, the pod's network namespace is replaced by
    a new one with the same address, and a fresh agent starts in it."""
    kill_agent(lab)
    pod = lab.plan.ns("pod")
    for pid in netns.run(None, ["ip", "netns", "pids", pod], check=False).split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)  # every container of the pod dies with it
    netns.remove(pod)
    wait_for(
        lambda: None if device.link_exists(lab.plan.ns("node"), "pod") else True,
        phase="old pod network gone",
        deadline=Deadline.after(timeout),
        describe=lambda: "the node's veth to the old pod still exists",
    )
    _attach_host(lab, lab.plan.ns("node"), "pod", pod, 4)
    lab.start_agent(key, timeout=timeout)


def _attach_host(lab: Lab, router_ns: str, router_dev: str, ns: str, segment: int) -> None:
    """A new namespace ``ns`` wired to a lab router by a veth: the router's end takes host 1 of
    the lab segment, the new host ("eth0") host 2, with a default route through the router."""
    netns.create(ns)
    netns.sysctl(ns, NO_DAD)
    with device.netlink(router_ns) as ipr:
        ipr.link("add", ifname=router_dev, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns})
    for side_ns, dev, host in ((router_ns, router_dev, 1), (ns, "eth0", 2)):
        with device.netlink(side_ns) as ipr:
            link = ipr.link_lookup(ifname=dev)[0]
            for version in (4, 6):
                ipr.addr(
                    "add",
                    index=link,
                    address=str(lab.plan.address(version, segment, host)),
                    prefixlen=lab.plan.prefix(version),
                    flags=device.IFA_F_NODAD if version == 6 else 0,
                )
            ipr.link("set", index=link, state="up")
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
    with device.netlink(ns) as ipr:
        for version, default in ((4, "0.0.0.0/0"), (6, "::/0")):
            ipr.route("add", dst=default, gateway=str(lab.plan.address(version, segment, 1)))


def add_internet_host(lab: Lab, index: int) -> str:
    """Another host on the internet side (hung off the WAN router): a stranger to the tunnel.

    Returns its namespace, ``svt-<run>-stranger<index>``; the caller removes it.
    """
    ns = lab.plan.ns(f"stranger{index}")
    _attach_host(lab, lab.plan.ns("wan"), f"s{index}", ns, 5 + index)
    return ns


def _pod_flows(lab: Lab) -> list[str]:
    pod = str(lab.plan.pod_address(4))
    return [
        line
        for line in lab.conntrack("node").splitlines()
        if "src=" in line and line.split("src=")[1].startswith(pod + " ")
    ]


def flush_node_conntrack_pod_first(lab: Lab, timeout: float = 10.0) -> None:
    """The original's catch, mid-session: the node forgets the flow and the pod (which must be
    sending) speaks before the external end does, so its traffic is masqueraded to the node
    address and the entry it leaves blocks the old flow. The external side's tunnel traffic is
    held back at the home router until that has happened."""
    block = "table inet svtblock {\n  chain forward {\n    type filter hook forward priority -10; policy accept;\n"
    block += f'    iifname "lan" udp dport {lab.plan.port} drop\n  }}\n}}\n'
    nft.apply(block, lab.plan.ns("home"))
    try:
        flush_conntrack(lab, "node")
        wait_for(
            lambda: True if _pod_flows(lab) else None,
            phase="the pod speaking first",
            deadline=Deadline.after(timeout),
            describe=lambda: "no flow from the pod on the node; is it sending?",
        )
    finally:
        nft.delete_table("inet", "svtblock", lab.plan.ns("home"))


HELLO_FLOOD = """
import os, socket, sys, time
start = time.monotonic()
end, rate, sent = start + float(sys.argv[3]), float(sys.argv[4]), 0
payload = b"SVTN" + os.urandom(60)
with socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.connect((sys.argv[1], int(sys.argv[2])))
    while (now := time.monotonic()) < end:
        if rate and sent > rate * (now - start):
            time.sleep(0.001)
            continue
        for _ in range(100):
            try:
                s.send(payload)
            except OSError:
                pass
        sent += 100
print(sent)
"""


def hello_flood_argv(address: str, port: int, seconds: float, rate: float = 0) -> list[str]:
    """A stranger's flood: datagrams that start with the protocol's magic, ``rate`` a second (0: as fast as
    one process sends them), for ``seconds``; prints how many it sent."""
    return [sys.executable, "-c", HELLO_FLOOD, address, str(port), str(seconds), str(rate)]


def limiter_counts(ns: str, port: int) -> tuple[int, int]:
    """(dropped, passed): handshake datagrams the agent's per-source ingress limit (``nft.hello_limit``) has
    dropped in ``ns``, and those it let through to the agent."""
    table = json.loads(netns.run(ns, ["nft", "-j", "list", "table", "netdev", nft.limit_table(port)]))
    rules = [item["rule"]["expr"] for item in table["nftables"] if "rule" in item]
    counted = [
        (any("drop" in e for e in rule), e["counter"]["packets"]) for rule in rules for e in rule if "counter" in e
    ]
    return sum(n for drop, n in counted if drop), sum(n for drop, n in counted if not drop)
