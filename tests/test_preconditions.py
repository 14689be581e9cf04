"""The checks before a network is injected into someone's pod, as pure functions over what the API
server says (its answers themselves are tested end to end in test_kube_e2e)."""

from __future__ import annotations

import pytest

from pytest_svctunnel.backends.kubernetes.preconditions import (
    INJECTION_NEEDS,
    PSA_ENFORCE,
    Permission,
    permission_problem,
    pod_security_problem,
    version_problem,
)


@pytest.mark.parametrize(
    ("major", "minor", "refused"),
    [
        ("1", "24", True),
        ("1", "24+", True),  # vendors' minor versions carry a suffix
        ("1", "25", False),
        ("1", "37", False),
        ("1", "27+", False),
        ("2", "0", False),
        ("0", "99", True),
        ("", "", False),  # not stated plainly: the request itself will tell
        ("1", "x", False),
    ],
)
def test_version(major: str, minor: str, refused: bool) -> None:
    problem = version_problem(major, minor)
    assert (problem is not None) == refused, problem
    if problem is not None:
        assert f"Kubernetes {major}." in problem and "1.25 or newer" in problem and "sidecar" in problem


@pytest.mark.parametrize(
    ("labels", "refused"),
    [
        (None, False),
        ({}, False),
        ({PSA_ENFORCE: "privileged"}, False),
        ({"pod-security.kubernetes.io/warn": "restricted"}, False),  # warns, does not refuse
        ({PSA_ENFORCE: "baseline"}, True),
        ({PSA_ENFORCE: "restricted"}, True),
    ],
)
def test_pod_security(labels: dict[str, str] | None, refused: bool) -> None:
    problem = pod_security_problem("cnf", labels)
    assert (problem is not None) == refused, problem
    if problem is not None:
        assert f"kubectl label namespace cnf {PSA_ENFORCE}=privileged --overwrite" in problem, problem
        assert "NET_ADMIN" in problem


def test_permissions() -> None:
    assert permission_problem("cnf", []) is None
    problem = permission_problem("cnf", [Permission("patch", "pods/ephemeralcontainers")])
    assert problem is not None
    assert "may not patch pods/ephemeralcontainers in namespace cnf" in problem, problem
    assert "Role" in problem and "admin and edit roles do not include" in problem, problem


def test_injection_needs_the_ephemeral_containers_subresource() -> None:
    assert Permission("patch", "pods/ephemeralcontainers") in INJECTION_NEEDS
