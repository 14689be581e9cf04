"""The root rule as an unprivileged user meets it: tests marked ``root`` skip cleanly (no fixture of
theirs runs, not even a module-scoped one such as the e2e cluster), and where CI is set each fails
with the rule's message instead. The inner runs are this suite's own tests, without privileges:
as root, in a user namespace of their own (uid 65534, no capabilities, same files)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT_RULE

ROOT = Path(__file__).parent.parent
SELECTION = (
    "tests/test_kube_e2e.py::test_example_suite_through_kube_proxy",  # two, with a module-scoped root fixture
    "tests/test_recovery.py::test_home_nat_rebinds",  # function-scoped root fixtures
    "tests/test_values.py::test_booleans[yes]",  # needs nothing
)


def unprivileged_pytest(ci: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "CI" and not k.startswith("SVCTUNNEL_")}
    if ci:
        env["CI"] = "true"
    drop = ["unshare", "--user", "--"] if os.geteuid() == 0 else []
    argv = [*drop, sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-rA"]
    return subprocess.run([*argv, *SELECTION], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_without_root_root_tests_skip_before_any_fixture() -> None:
    done = unprivileged_pytest(ci=False)
    assert done.returncode == pytest.ExitCode.OK, done.stdout + done.stderr
    assert "error" not in done.stdout.lower().split("short test summary")[-1], done.stdout
    skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")]
    counts = [re.fullmatch(rf"SKIPPED \[(\d+)\] \S+: {ROOT_RULE}", line) for line in skipped]
    assert all(counts) and sum(int(m[1]) for m in counts if m) == 3, done.stdout
    assert done.stdout.rstrip().splitlines()[-1].strip("= ").startswith("1 passed, 3 skipped in "), done.stdout


def test_without_root_in_ci_each_root_test_fails_with_the_rule() -> None:
    done = unprivileged_pytest(ci=True)
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    failed = [line for line in done.stdout.splitlines() if line.startswith(("ERROR", "FAILED"))]
    assert len(failed) == 3, done.stdout
    assert all(f"{ROOT_RULE}, but CI runs without them" in line for line in failed), done.stdout
    assert "Operation not permitted" not in done.stdout, "a fixture ran before the rule"
