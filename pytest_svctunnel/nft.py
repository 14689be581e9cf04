"""nftables rulesets, applied atomically with ``nft -f -``.

The agent's filter keeps the tunnel port closed to everyone but the current
authenticated peer, so strangers' datagrams never reach the VXLAN device, and
handshake datagrams (already copied to the hello tap) go no further either.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from .errors import KernelError
from .protocol import MAGIC, Endpoint

_NFT_TIMEOUT_S = 10.0


def nft_binary() -> str:
    path = shutil.which("nft")
    if path is None:
        raise KernelError("the 'nft' command is missing; install nftables (Debian/Ubuntu: apt-get install nftables)")
    return path


def ns_prefix(netns: str | None) -> list[str]:
    """The argv prefix that runs a command in ``netns`` (empty for this namespace)."""
    return ["ip", "netns", "exec", netns] if netns else []


def apply(ruleset: str, netns: str | None = None) -> None:
    """Load ``ruleset`` in one transaction: all of it or none."""
    argv = [*ns_prefix(netns), nft_binary(), "-f", "-"]
    try:
        done = subprocess.run(argv, input=ruleset, capture_output=True, text=True, timeout=_NFT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise KernelError(f"nft did not finish within {_NFT_TIMEOUT_S:g} s in {netns or 'this namespace'}") from None
    if done.returncode != 0:
        where, problem = netns or "this namespace", done.stderr.strip()
        if "Operation not permitted" in problem:  # the ruleset is fine; the process may not load any
            raise KernelError(
                f"nft was refused in {where} ({' '.join(problem.split())}): it needs CAP_NET_ADMIN there;"
                " in a pod, add NET_ADMIN to the container's securityContext.capabilities"
            )
        raise KernelError(f"nft failed in {where}: {problem}\n{ruleset}")


def replace_table(family: str, name: str, body: str) -> str:
    """A ruleset that swaps in a new version of one table atomically."""
    return f"table {family} {name}\ndelete table {family} {name}\ntable {family} {name} {{\n{body}\n}}\n"


def delete_table(family: str, name: str, netns: str | None = None) -> None:
    """Remove a table; one that is already gone is success."""
    apply(f"table {family} {name}\ndelete table {family} {name}\n", netns)


def table_exists(family: str, name: str, netns: str | None = None) -> bool:
    """Whether the namespace has the table."""
    argv = [*ns_prefix(netns), nft_binary(), "list", "table", family, name]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=_NFT_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise KernelError(f"nft did not finish within {_NFT_TIMEOUT_S:g} s in {netns or 'this namespace'}") from None
    if done.returncode != 0 and "Operation not permitted" in done.stderr:
        raise KernelError(
            f"nft was refused in {netns or 'this namespace'}: it needs CAP_NET_ADMIN there;"
            " in a pod, add NET_ADMIN to the container's securityContext.capabilities"
        )
    return done.returncode == 0


def filter_table(port: int) -> str:
    return f"svctunnel_{port}"


HELLO_RATE = 10  # handshake datagrams per second from one address that reach the agent; a client sends 1
HELLO_BURST = 20


def limit_table(port: int) -> str:
    return f"svctunnel_{port}_hellos"


def hello_limit(port: int, devices: Sequence[str]) -> str:
    """A netdev ingress table on ``devices`` that drops handshake datagrams (UDP to ``port`` starting
    with the magic) from any one address beyond HELLO_RATE a second. It runs before the kernel hands
    packets to the agent's hello sockets, so a stranger's flood costs softirq time, not the agent's
    (or, injected, the application's pod's) CPU; every other address keeps its own allowance."""
    magic = f"@th,64,{8 * len(MAGIC)} {int.from_bytes(MAGIC, 'big'):#x}"
    limit = f"limit rate over {HELLO_RATE}/second burst {HELLO_BURST} packets"
    names = ", ".join(devices)
    body = (
        "  set sources4 { type ipv4_addr; size 65535; flags dynamic,timeout; timeout 60s; }\n"
        "  set sources6 { type ipv6_addr; size 65535; flags dynamic,timeout; timeout 60s; }\n"
        "  chain ingress {\n"
        f"    type filter hook ingress devices = {{ {names} }} priority -500; policy accept;\n"
        f"    meta protocol ip meta l4proto udp udp dport {port} {magic} update @sources4 {{ ip saddr {limit} }}"
        " counter drop\n"
        f"    meta protocol ip6 meta l4proto udp udp dport {port} {magic} update @sources6 {{ ip6 saddr {limit} }}"
        " counter drop\n"
        f"    meta l4proto udp udp dport {port} {magic} counter\n"  # what reached the agent
        "  }"
    )
    return replace_table("netdev", limit_table(port), body)


def pod_filter(port: int, peer: Endpoint | None, pass_handshakes: bool = False) -> str:
    """The agent's input filter for the tunnel port: only the peer gets through. With
    ``pass_handshakes`` (hostNetwork: the node's own conntrack must confirm the Service's DNAT of
    a hello, or the answer leaves un-NATed) datagrams that start with the magic pass too; no
    socket takes them, only the agent's tap reads them."""
    rules = []
    if pass_handshakes:
        magic = int.from_bytes(MAGIC, "big")
        rules.append(f"    udp dport {port} @th,64,{8 * len(MAGIC)} {magic:#x} accept")
    if peer is not None:
        ip = "ip" if peer.address.version == 4 else "ip6"
        rules.append(f"    udp dport {port} {ip} saddr {peer.address} udp sport {peer.port} accept")
    rules.append(f"    udp dport {port} counter drop")
    body = "  chain input {\n    type filter hook input priority -150; policy accept;\n" + "\n".join(rules) + "\n  }"
    return replace_table("inet", filter_table(port), body)
