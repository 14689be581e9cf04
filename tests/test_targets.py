"""Targets: how a user writes which pods a network goes into, and the choice among listed pods."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pytest_svctunnel.errors import ConfigError, KubeError
from pytest_svctunnel.targets import Target, choose, parse_target, target_option


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("cnf/app=upf", Target("cnf", selector="app=upf")),
        ("cnf/app=upf,tier!=db", Target("cnf", selector="app=upf,tier!=db")),
        ("cnf/env in (a,b)", Target("cnf", selector="env in (a,b)")),
        ("cnf/!canary", Target("cnf", selector="!canary")),
        ("cnf/app==upf", Target("cnf", selector="app==upf")),
        ("cnf/upf-0", Target("cnf", name="upf-0")),
        ("cnf/upf", Target("cnf", name="upf")),
        (" default/web.v2 ", Target("default", name="web.v2")),
    ],
)
def test_parse(text: str, expected: Target) -> None:
    assert parse_target(text) == expected
    assert str(parse_target(text)) == text.strip()


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("upf", "is not NAMESPACE/SELECTOR or NAMESPACE/NAME"),
        ("cnf/", "is not NAMESPACE/SELECTOR or NAMESPACE/NAME"),
        ("/app=upf", "is not a namespace name"),
        ("CNF/app=upf", "is not a namespace name"),
        ("cnf/Upf_0", "neither a pod name nor a label selector"),
        ("cnf/app", None),  # a bare word is a pod name (or its start), never an existence selector
    ],
)
def test_parse_errors(text: str, says: str | None) -> None:
    if says is None:
        assert parse_target(text).name == "app"
        return
    with pytest.raises(ValueError, match=says) as caught:
        parse_target(text)
    assert "cnf/app=upf" in str(caught.value), "the error shows the forms"
    with pytest.raises(ConfigError):
        target_option(text)


def pod(name: str, phase: str = "Running", host_network: bool = False, deleting: bool = False) -> Any:
    return SimpleNamespace(
        metadata=SimpleNamespace(name=name, deletion_timestamp="now" if deleting else None),
        spec=SimpleNamespace(host_network=host_network),
        status=SimpleNamespace(phase=phase),
    )


PODS = [pod("upf-b"), pod("upf-a"), pod("smf-0")]


def names(found: list[Any]) -> list[str]:
    return [p.metadata.name for p in found]


def test_choose() -> None:
    assert names(choose(Target("cnf", selector="app=upf"), PODS[:2])) == ["upf-a", "upf-b"]
    assert names(choose(Target("cnf", name="smf-0"), PODS)) == ["smf-0"]
    assert names(choose(Target("cnf", name="smf"), PODS)) == ["smf-0"]
    assert names(choose(Target("cnf", name="upf-a"), [*PODS, pod("upf-ab")])) == ["upf-a"], "an exact name wins"


@pytest.mark.parametrize(
    ("target", "pods", "says"),
    [
        (Target("cnf", name="upf"), PODS, "ambiguous: it begins the names of upf-a, upf-b"),
        (Target("cnf", name="amf"), PODS, "matches no pod; the namespace has smf-0, upf-a, upf-b"),
        (Target("cnf", selector="app=amf"), [], "matches no pod; the namespace has no pods"),
        (Target("cnf", name="smf-0"), [pod("smf-0", "Pending")], "smf-0 (is Pending)"),
        (Target("cnf", name="smf-0"), [pod("smf-0", host_network=True)], "smf-0 (uses the host's network)"),
        (Target("cnf", name="smf-0"), [pod("smf-0", deleting=True)], "smf-0 (is being deleted)"),
        (Target("cnf", selector="a=b"), [pod("x"), pod("y", "Failed")], "y (is Failed)"),
    ],
)
def test_choose_errors(target: Target, pods: list[Any], says: str) -> None:
    with pytest.raises(KubeError) as caught:
        choose(target, pods)
    assert says in str(caught.value), caught.value
