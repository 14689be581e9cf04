"""Soak: pings over the tunnel for a while, with faults injected at random (run as root).

    python benchmarks/soak.py [minutes] [keepalive-seconds]

Prints packet loss, the longest outage, and each fault's recovery time (from the
fault ending to the first ping that passed after it). Faults: the node's conntrack
flushed while the pod sends, the pod restarted, the home NAT rebinding, the agent
stopped for a while, the external end restarted.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests' fault injection

from pytest_svctunnel import keys, names
from pytest_svctunnel.connector import ConnectSettings, ExternalEnd
from pytest_svctunnel.lab import Lab
from pytest_svctunnel.networks import single_network
from pytest_svctunnel.probe import ping_once
from pytest_svctunnel.runs import Run
from tests import faults


class Pinger(threading.Thread):
    """IPv4 and IPv6 pings in turn, every 0.1 s; remembers when each passed or failed."""

    def __init__(self, dev: str, targets: list[object]) -> None:
        super().__init__(daemon=True)
        self.dev, self.targets = dev, targets
        self.results: list[tuple[float, bool]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        turn = 0
        while not self.stop.is_set():
            target = self.targets[turn % len(self.targets)]
            started = time.monotonic()
            try:
                ok = ping_once(self.dev, target, 0.2)  # type: ignore[arg-type]
            except OSError:
                ok = False
            self.results.append((started, ok))
            turn += 1
            self.stop.wait(max(0.0, 0.1 - (time.monotonic() - started)))

    def first_success_after(self, moment: float, wait: float) -> float | None:
        end = time.monotonic() + wait
        while time.monotonic() < end:
            for at, ok in reversed(self.results):
                if at < moment:
                    break
                if ok:
                    return at - moment
            time.sleep(0.05)
        return None


def main() -> None:
    minutes = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    keepalive = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    run = Run.new()
    lab = Lab(run)
    lab.up()
    key = keys.new_key()
    net = single_network(names.link_name(run.id, "soak"), 333, None, None, None, None)
    settings = ConnectSettings(lab.plan.service(4), key, (net,), 30.0, None, keepalive, 3)
    talker: subprocess.Popen[bytes] | None = None
    end: ExternalEnd | None = None
    recoveries: dict[str, list[float]] = {}
    unrecovered: Counter[str] = Counter()
    try:
        lab.start_agent(key)
        end = ExternalEnd(settings)
        end.open()
        assert net.remote_ipv4 is not None and net.remote_ipv6 is not None
        pinger = Pinger(net.dev, [net.remote_ipv4.ip, net.remote_ipv6.ip])
        pinger.start()
        talker = _pod_talker(lab, str(net.local_ipv4.ip) if net.local_ipv4 else "")
        print(f"soak: {minutes:g} min, keepalive {keepalive:g} s, misses 3", flush=True)
        stop_at = time.monotonic() + minutes * 60
        rng = random.Random(7)
        while time.monotonic() < stop_at:
            time.sleep(rng.uniform(10, 20))
            kind = rng.choice(["conntrack", "pod-restart", "nat-rebind", "agent-stop", "external-restart"])
            ended = _inject(kind, lab, key, rng)
            if kind == "pod-restart" and talker is not None:
                talker.wait(5)
                talker = _pod_talker(lab, str(net.local_ipv4.ip) if net.local_ipv4 else "")
            if kind == "external-restart":
                end.close()
                ended = time.monotonic()
                end = ExternalEnd(settings)
                end.open()
            took = pinger.first_success_after(ended, 30 * keepalive)
            if took is None:
                unrecovered[kind] += 1
            else:
                recoveries.setdefault(kind, []).append(took)
            print(f"  {kind}: back after {'-' if took is None else f'{took:.2f} s'}", flush=True)
        pinger.stop.set()
        pinger.join(5)
        _report(pinger.results, recoveries, unrecovered)
    finally:
        if talker is not None:
            talker.terminate()
        if end is not None:
            end.close()
        lab.down()
        run.remove()


def _pod_talker(lab: Lab, address: str) -> subprocess.Popen[bytes]:
    """The pod keeps sending, so a conntrack flush is followed by the pod speaking first."""
    argv = ["ip", "netns", "exec", lab.plan.ns("pod"), "ping", "-q", "-i", "0.2", address]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _inject(kind: str, lab: Lab, key: bytes, rng: random.Random) -> float:
    """Cause one fault; returns the moment it ended."""
    if kind == "conntrack":
        faults.flush_node_conntrack_pod_first(lab)
    elif kind == "pod-restart":
        faults.restart_pod(lab, key)
    elif kind == "nat-rebind":
        low = rng.choice([20000, 30000, 40000, 50000])
        faults.rebind_home_nat(lab, (low, low + 9999))
    elif kind == "agent-stop":
        lab.stop_agent()
        time.sleep(rng.uniform(3, 10))
        lab.start_agent(key)
    return time.monotonic()


def _report(results: list[tuple[float, bool]], recoveries: dict[str, list[float]], unrecovered: Counter[str]) -> None:
    sent = len(results)
    lost = sum(1 for _, ok in results if not ok)
    longest = current = 0.0
    start: float | None = None
    for at, ok in results:
        if not ok and start is None:
            start = at
        if ok and start is not None:
            current, start = at - start, None
            longest = max(longest, current)
    print(f"pings: {sent} sent, {lost} lost ({lost / max(sent, 1):.2%}); longest outage {longest:.2f} s")
    for kind, times in sorted(recoveries.items()):
        print(f"  {kind}: {len(times)} recovered, median {statistics.median(times):.2f} s, max {max(times):.2f} s")
    for kind, count in sorted(unrecovered.items()):
        print(f"  {kind}: {count} NOT recovered within 30 keepalives")


if __name__ == "__main__":
    main()
