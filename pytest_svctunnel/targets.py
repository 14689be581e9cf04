"""Which pods of the user's workload a network goes into: the target, written ``NAMESPACE/SELECTOR``
or ``NAMESPACE/NAME``, and the choice among the pods the API server lists.

A label selector has an operator (``app=upf``, ``tier!=db``, ``env in (a,b)``, ``!canary``); anything
else after the slash is a pod name, or the start of exactly one pod's name (``upf`` finds
``upf-7d9f8-x2x4k``). Pure logic, light to import: the plugin checks a target at configure time.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError, KubeError

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_SELECTOR_OPERATORS = re.compile(r"[=!]|\s(in|notin)\s*\(")
EXAMPLES = "e.g. 'cnf/app=upf' (a label selector) or 'cnf/upf-0' (a pod name)"


@dataclass(frozen=True)
class Target:
    """Pods in ``namespace``: those ``selector`` matches, or the one ``name`` names (or begins)."""

    namespace: str
    selector: str | None = None
    name: str | None = None

    def __str__(self) -> str:
        return f"{self.namespace}/{self.selector if self.selector is not None else self.name}"


def parse_target(text: str) -> Target:
    """``NAMESPACE/SELECTOR`` or ``NAMESPACE/NAME``; ValueError says what is wrong and shows the forms."""
    namespace, slash, rest = text.strip().partition("/")
    rest = rest.strip()
    if not slash or not rest:
        raise ValueError(f"{text!r} is not NAMESPACE/SELECTOR or NAMESPACE/NAME ({EXAMPLES})")
    if not _DNS_LABEL.match(namespace):
        raise ValueError(f"{namespace!r} is not a namespace name (lower-case letters, digits, '-'); {EXAMPLES}")
    if _SELECTOR_OPERATORS.search(rest):
        return Target(namespace, selector=rest)
    if not _DNS_SUBDOMAIN.match(rest):
        raise ValueError(
            f"{rest!r} is neither a pod name nor a label selector (a selector needs an operator:"
            f" 'app=upf', 'tier!=db', 'env in (a,b)', '!canary'); {EXAMPLES}"
        )
    return Target(namespace, name=rest)


def target_option(text: str) -> Target:
    """``parse_target`` for option tables: a ConfigError instead of ValueError."""
    try:
        return parse_target(text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def choose(target: Target, pods: Sequence[Any]) -> list[Any]:
    """The target's pods among ``pods`` (what the API server listed in its namespace, with its
    selector applied when there is one), each Running and not on the host network. KubeError
    names what was found when that is not a usable set."""
    if target.name is not None:
        exact = [p for p in pods if p.metadata.name == target.name]
        found = exact or [p for p in pods if p.metadata.name.startswith(target.name)]
        if len(found) > 1:
            raise KubeError(
                f"target {target} is ambiguous: it begins the names of {_names(found)}; name one pod,"
                " or target them all with a label selector (each gets a network of its own)"
            )
    else:
        found = list(pods)
    if not found:
        raise KubeError(f"target {target} matches no pod; the namespace has {_names(pods) or 'no pods'}")
    unusable = [f"{p.metadata.name} ({why})" for p in found if (why := _unusable(p)) is not None]
    if unusable:
        raise KubeError(
            f"target {target}: {', '.join(unusable)}; a network goes only into a Running pod with a"
            " network namespace of its own (wait for it to run, or target others)"
        )
    return sorted(found, key=lambda p: str(p.metadata.name))


def _unusable(pod: Any) -> str | None:
    if pod.spec.host_network:
        return "uses the host's network"
    if pod.metadata.deletion_timestamp is not None:
        return "is being deleted"
    if pod.status.phase != "Running":
        return f"is {pod.status.phase}"
    return None


def _names(pods: Sequence[Any]) -> str:
    return ", ".join(sorted(str(p.metadata.name) for p in pods))
