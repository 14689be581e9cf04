"""Setup and teardown of a Kubernetes session, on the test cluster (run as root).

    python benchmarks/kube_session.py [ROUNDS]        # default: 5 rounds

Starts the test cluster of ``tests/kubelab`` (real etcd, kube-apiserver, scheduler, controller
manager, two kubelets on containerd and kube-proxy), then runs the example suite as a separate
pytest process ROUNDS times in each Service type, with the plugin's defaults. Prints each round's
own summary lines (setup by phase, teardown) and the whole pytest process's wall time, then per
Service type the median and range of setup and teardown. The first round of each type is a warm
up (the nodes have the image already; the kubelet and kube-proxy see their first Service) and is
printed but not counted.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.kubelab.cluster import running_cluster  # noqa: E402  (the test cluster lives with the tests)

EXAMPLE = ROOT / "examples" / "test_multinet.py"
READY = re.compile(r"^svctunnel: tunnel ready in (?P<setup>[0-9.]+) s(?P<phases>.*)$", re.MULTILINE)
REMOVED = re.compile(r"tunnel removed in (?P<teardown>[0-9.]+) s")
SERVICE_TYPES = ("LoadBalancer", "NodePort")


@dataclass(frozen=True)
class Round:
    setup_s: float
    phases: str
    teardown_s: float
    wall_s: float


def one_round(suite: Path, kubeconfig: Path, service_type: str) -> Round:
    env = {**os.environ, "SVCTUNNEL_KUBECONFIG": str(kubeconfig), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(suite)]
    command += ["--svctunnel-service-type", service_type]
    started = time.monotonic()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - started
    ready, removed = READY.search(done.stdout), REMOVED.search(done.stdout)
    if done.returncode != 0 or ready is None or removed is None:
        raise SystemExit(f"the example suite failed (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")
    return Round(float(ready["setup"]), ready["phases"].strip(), float(removed["teardown"]), wall)


def summary(name: str, values: list[float]) -> str:
    return f"{name} median {statistics.median(values):.2f} s (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    with tempfile.TemporaryDirectory(prefix="svctunnel-bench-") as tmp:
        suite = Path(tmp) / "test_multinet.py"
        suite.write_text(EXAMPLE.read_text())
        with running_cluster(Path(tmp) / "cluster") as cluster:
            for service_type in SERVICE_TYPES:
                results = []
                for index in range(rounds + 1):
                    result = one_round(suite, cluster.kubeconfig, service_type)
                    label = "warm-up" if index == 0 else f"round {index}"
                    print(
                        f"{service_type} {label}: setup {result.setup_s:.2f} s {result.phases};"
                        f" teardown {result.teardown_s:.2f} s; pytest ran {result.wall_s:.2f} s",
                        flush=True,
                    )
                    if index:
                        results.append(result)
                print(
                    f"{service_type}: {summary('setup', [r.setup_s for r in results])};"
                    f" {summary('teardown', [r.teardown_s for r in results])};"
                    f" {summary('pytest', [r.wall_s for r in results])}",
                    flush=True,
                )


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("run as root: the test cluster needs network namespaces")
    main()
