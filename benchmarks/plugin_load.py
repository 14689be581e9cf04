"""How much loading the plugin adds to a pytest run that does not use it.

    python benchmarks/plugin_load.py [runs]

Prints the median wall time of `pytest --collect-only` on an empty test file
with the plugin disabled and enabled, and the difference (target: < 150 ms).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def median_run(argv: list[str], cwd: Path, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(argv, cwd=cwd, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 15
    with tempfile.TemporaryDirectory() as tmp:
        cwd = Path(tmp)
        (cwd / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
        base = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"]
        median_run(base, cwd, 2)  # warm the file cache
        without = median_run([*base, "-p", "no:svctunnel"], cwd, runs)
        with_plugin = median_run(base, cwd, runs)
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "import pytest_svctunnel.plugin, sys; print('kubernetes' in sys.modules, 'pyroute2' in sys.modules)",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    print(
        f"pytest --collect-only, median of {runs}: without plugin {without * 1000:.0f} ms, "
        f"with plugin {with_plugin * 1000:.0f} ms, plugin adds {(with_plugin - without) * 1000:.0f} ms"
    )
    print(f"modules loaded by the plugin alone: kubernetes, pyroute2 = {done.stdout.strip()}")


if __name__ == "__main__":
    main()
