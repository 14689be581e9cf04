"""Settings: the option table, and resolving CLI > environment > ini > default.

Pure: plugin.py feeds it the raw values, it hands back one frozen object that
knows where each value came from (for the report header).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .backends.kubernetes.options import DEFAULT_IMAGE, SERVICE_TYPES
from .errors import ConfigError
from .networks import network_option
from .protocol import DEFAULT_PORT
from .targets import Target, target_option
from .values import (
    IPAddress,
    choice,
    parse_address,
    parse_bool,
    parse_ifname,
    parse_misses,
    parse_port,
    parse_seconds,
    parse_text,
    parse_vni,
)

BACKENDS = ("kubernetes", "lab")
KEEP = ("never", "on-failure", "always")
MAX_IDLE_EXIT_S = 3600.0
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")


def _matching(pattern: re.Pattern[str], what: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if not pattern.fullmatch(text):
            raise ValueError(f"not {what}")
        return text

    return parse


parse_namespace = _matching(_DNS_LABEL, "a Kubernetes namespace name (lower-case letters, digits and '-', at most 63)")


def parse_idle_exit(text: str) -> float:
    seconds = parse_seconds(text)
    if not 10 <= seconds <= MAX_IDLE_EXIT_S:
        raise ValueError(f"give 10 to {MAX_IDLE_EXIT_S:g} seconds")
    return seconds


parse_node = _matching(_DNS_SUBDOMAIN, "a Kubernetes node name (lower-case letters, digits, '-' and '.')")


@dataclass(frozen=True)
class Option:
    """One setting: pytest option ``--svctunnel-<flag>``, ini ``svctunnel_<key>``, env ``SVCTUNNEL_<KEY>``."""

    key: str
    parse: Callable[[str], Any]
    default: str | None
    help: str

    @property
    def flag(self) -> str:
        return "--svctunnel-" + self.key.replace("_", "-")

    @property
    def ini(self) -> str:
        return "svctunnel_" + self.key

    @property
    def env(self) -> str:
        return "SVCTUNNEL_" + self.key.upper()


OPTIONS: tuple[Option, ...] = (
    Option(
        "backend",
        choice(BACKENDS),
        "kubernetes",
        "where the pod end runs: kubernetes (the cluster of the kubeconfig) or lab (namespaces on this host)",
    ),
    Option("peer", parse_address, None, "the address hellos must come from, as the pod sees it; others are ignored"),
    Option("port", parse_port, str(DEFAULT_PORT), "the Service's UDP port, also the pod end's listening port"),
    Option("vni", parse_vni, "333", "VNI of the default network"),
    Option(
        "ipv4",
        network_option(4),
        None,
        "the default network's IPv4 network, e.g. 10.31.0.0/30 (the pod end takes its first address, this end the"
        " second; default: the first /30 from 10.30.30.0 on that no other run on this host holds)",
    ),
    Option(
        "ipv6",
        network_option(6),
        None,
        "the default network's IPv6 network, e.g. fd00:31::/126 (default: the first free /126 from fd00:3030::)",
    ),
    Option("timeout", parse_seconds, "60", "deadline in seconds for each setup and teardown phase"),
    Option("keep", choice(KEEP), "never", "keep what the session built: never, on-failure or always"),
    Option("underlay_dev", parse_ifname, None, "this host's device towards the Service (default: from the route)"),
    Option("keepalive", parse_seconds, "5", "seconds between keepalives through the tunnel"),
    Option("misses", parse_misses, "3", "keepalives missed in a row before the path counts as dead"),
    Option("reap", parse_bool, "false", "at session start, remove what runs that are gone left behind"),
    Option("kubeconfig", parse_text, None, "kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)"),
    Option("context", parse_text, None, "kubeconfig context (default: its current context)"),
    Option("namespace", parse_namespace, None, "namespace of the pod end (default: a fresh one per session)"),
    Option("image", parse_text, DEFAULT_IMAGE, "image of the pod end; its entrypoint must be 'svctunnel'"),
    Option("service_type", choice(SERVICE_TYPES), "LoadBalancer", "the UDP Service's type: LoadBalancer or NodePort"),
    Option("node", parse_node, None, "run the pod end with hostNetwork on this node: the networks land on the node"),
    Option("bridge", parse_ifname, None, "with --svctunnel-node: each network's device joins this bridge on the node"),
    Option(
        "target",
        target_option,
        None,
        "inject the networks into these pods of your workload, NAMESPACE/SELECTOR or NAMESPACE/NAME"
        " (default: the plugin's own pod end)",
    ),
    Option("pod_dev", parse_ifname, None, "the default network's device name in the pod (default: as this end's)"),
    Option(
        "idle_exit",
        parse_idle_exit,
        "600",
        "an injected agent that hears nothing from its peer this many seconds removes its devices and exits",
    ),
)
OPTION_BY_KEY = {o.key: o for o in OPTIONS}


@dataclass(frozen=True)
class TunnelConfig:
    """The effective settings of one session, and where each came from."""

    backend: str
    peer: IPAddress | None
    port: int
    vni: int
    ipv4: ipaddress.IPv4Network | None
    ipv6: ipaddress.IPv6Network | None
    timeout: float
    keep: str
    underlay_dev: str | None
    keepalive: float
    misses: int
    reap: bool
    kubeconfig: str | None
    context: str | None
    namespace: str | None
    image: str
    service_type: str
    node: str | None
    bridge: str | None
    target: Target | None
    pod_dev: str | None
    idle_exit: float
    sources: Mapping[str, str]

    def describe(self) -> list[str]:
        """One ``key=value (source)`` item per setting, for the report header."""
        return [f"{o.key}={getattr(self, o.key)} ({self.sources[o.key]})" for o in OPTIONS]


def resolve(
    cli: Mapping[str, str | None],
    env: Mapping[str, str],
    ini: Mapping[str, str | None],
) -> TunnelConfig:
    """Pick each setting from the first of CLI, environment, ini and default that has it."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for option in OPTIONS:
        raw, source = _first(option, cli, env, ini)
        values[option.key] = None if raw is None else _parse(option, raw, source)
        sources[option.key] = source
    if values["bridge"] is not None and values["node"] is None:
        where = _where(OPTION_BY_KEY["bridge"], sources["bridge"])
        raise ConfigError(
            f"{where}={values['bridge']} needs node mode: also set --svctunnel-node NAME, or leave out {where}"
        )
    if values["node"] is not None and values["service_type"] == "NodePort":
        raise ConfigError(
            f"{_where(OPTION_BY_KEY['node'], sources['node'])} with service type NodePort is not supported (in node"
            " mode the agent sees hellos before the node port is translated); use --svctunnel-service-type"
            " LoadBalancer, or leave out --svctunnel-node"
        )
    if values["target"] is not None and values["backend"] == "lab":
        raise ConfigError(
            f"{_where(OPTION_BY_KEY['target'], sources['target'])} needs the kubernetes backend: the lab has no"
            " pods of yours; leave out --svctunnel-backend lab"
        )
    if values["target"] is not None and values["node"] is not None:
        raise ConfigError(
            "--svctunnel-target and --svctunnel-node exclude each other: networks go into pods or onto a node"
        )
    return TunnelConfig(sources=sources, **values)


def _first(
    option: Option, cli: Mapping[str, str | None], env: Mapping[str, str], ini: Mapping[str, str | None]
) -> tuple[str | None, str]:
    if cli.get(option.key) is not None:
        return cli[option.key], "cli"
    if env.get(option.env):
        return env[option.env], "env"
    if ini.get(option.key):
        return ini[option.key], "ini"
    return option.default, "default"


def _where(option: Option, source: str) -> str:
    return {"cli": option.flag, "env": option.env, "ini": f"ini {option.ini}", "default": option.flag}[source]


def _parse(option: Option, raw: str, source: str) -> Any:
    where = _where(option, source)
    try:
        return option.parse(str(raw).strip())
    except ValueError as exc:
        raise ConfigError(f"{where}={raw!r} is invalid ({exc}); fix {where}") from None
