"""iperf3 TCP throughput from this host to a server in another network namespace (for the benchmarks)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Sequence

PORT = 5201


def tcp_gbits(enter: Sequence[str], bind: str, target: str, seconds: int, reverse: bool = False) -> float:
    """Gbit/s received with a one-shot iperf3 server run with ``enter`` (a command prefix that puts it into the
    server's network namespace: ``ip netns exec NS`` or ``nsenter -t PID -n``) on ``bind`` and a client here
    connecting to ``target`` for ``seconds``; the client sends, or with ``reverse`` the server does."""
    server = subprocess.Popen(
        [*enter, "iperf3", "-s", "-1", "-B", bind, "-p", str(PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        out = subprocess.run(
            ["iperf3", "-c", target, "-p", str(PORT), "-t", str(seconds), "-J", *(["-R"] if reverse else [])],
            capture_output=True,
            text=True,
            check=True,
            timeout=seconds + 30,
        ).stdout
    finally:
        server.wait(10)
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9
