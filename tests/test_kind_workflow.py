"""The KinD example job users copy: it runs the example suite with both load-balancer providers KinD users
have, each set up the way the README says (the job itself runs on GitHub, where Docker and KinD are)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

WORKFLOW = Path(__file__).parent.parent / ".github" / "workflows" / "kind-example.yml"


def job() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(WORKFLOW.read_text())
    return dict(loaded["jobs"]["kind"])


def steps(provider: str) -> list[str]:
    """The run scripts of the steps that run with ``provider``."""
    return [
        step.get("run", "")
        for step in job()["steps"]
        if "if" not in step or (f"== '{provider}'" in step["if"] and not step["if"].startswith("failure()"))
    ]


def test_both_providers_run_the_example_suite() -> None:
    assert job()["strategy"]["matrix"]["load-balancer"] == ["cloud-provider-kind", "metallb"]
    for provider in ("cloud-provider-kind", "metallb"):
        assert any("pytest examples" in script for script in steps(provider)), provider


def test_cloud_provider_kind_runs_and_may_use_the_only_node() -> None:
    script = "\n".join(steps("cloud-provider-kind"))
    assert "registry.k8s.io/cloud-provider-kind/cloud-controller-manager:v" in script
    assert "exclude-from-external-load-balancers-" in script
    assert "metallb" not in script


def test_metallb_is_a_release_that_honours_publish_not_ready_addresses() -> None:
    script = "\n".join(steps("metallb"))
    (version,) = re.findall(r"metallb/v(\d+)\.(\d+)\.(\d+)/", script)
    assert tuple(map(int, version)) >= (0, 14, 5), "MetalLB 0.14.0-0.14.4 ignore publishNotReadyAddresses"
    assert "cloud-provider-kind" not in script
