"""Settings: CLI > environment > ini > default, where each value came from, and errors naming what to fix."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pytest_svctunnel.config import OPTION_BY_KEY, OPTIONS, TunnelConfig, resolve
from pytest_svctunnel.errors import ConfigError
from pytest_svctunnel.targets import Target

from .helpers import OPTION_KEYS

KEYS = OPTION_KEYS
ENV = {k: "SVCTUNNEL_" + k.upper() for k in KEYS}
FLAG = {k: "--svctunnel-" + k.replace("_", "-") for k in KEYS}
INI = {k: "svctunnel_" + k for k in KEYS}

DEFAULTS: dict[str, Any] = {
    "backend": "kubernetes",
    "peer": None,
    "port": 5533,
    "vni": 333,
    "ipv4": None,
    "ipv6": None,
    "timeout": 60.0,
    "keep": "never",
    "underlay_dev": None,
    "keepalive": 5.0,
    "misses": 3,
    "reap": False,
    "kubeconfig": None,
    "context": None,
    "namespace": None,
    "image": "svctunnel-agent:0.1.0",
    "service_type": "LoadBalancer",
    "node": None,
    "bridge": None,
    "target": None,
    "pod_dev": None,
    "idle_exit": 600.0,
}

# key -> ((cli raw, parsed), (env raw, parsed), (ini raw, parsed)); all three differ where the option allows it.
LAYERS: dict[str, tuple[tuple[str, Any], tuple[str, Any], tuple[str, Any]]] = {
    "backend": (("lab", "lab"), ("kubernetes", "kubernetes"), ("lab", "lab")),
    "peer": (
        ("192.0.2.1", ipaddress.IPv4Address("192.0.2.1")),
        ("2001:db8::2", ipaddress.IPv6Address("2001:db8::2")),
        ("198.51.100.3", ipaddress.IPv4Address("198.51.100.3")),
    ),
    "port": (("1001", 1001), ("2002", 2002), ("3003", 3003)),
    "vni": (("11", 11), ("22", 22), ("16777215", 16777215)),
    "ipv4": (
        ("10.31.0.0/30", ipaddress.IPv4Network("10.31.0.0/30")),
        ("192.168.9.0/24", ipaddress.IPv4Network("192.168.9.0/24")),
        ("10.31.0.8/29", ipaddress.IPv4Network("10.31.0.8/29")),
    ),
    "ipv6": (
        ("fd00:31::/126", ipaddress.IPv6Network("fd00:31::/126")),
        ("fd00:32::/64", ipaddress.IPv6Network("fd00:32::/64")),
        ("2001:db8::/126", ipaddress.IPv6Network("2001:db8::/126")),
    ),
    "timeout": (("1.5", 1.5), ("3600", 3600.0), ("0.01", 0.01)),
    "keep": (("always", "always"), ("on-failure", "on-failure"), ("always", "always")),
    "underlay_dev": (("eth1", "eth1"), ("ens2", "ens2"), ("bond3", "bond3")),
    "keepalive": (("0.5", 0.5), ("2", 2.0), ("30", 30.0)),
    "misses": (("1", 1), ("5", 5), ("100", 100)),
    "reap": (("true", True), ("0", False), ("yes", True)),
    "kubeconfig": (("/a/config", "/a/config"), ("b.yaml", "b.yaml"), ("~/c", "~/c")),
    "context": (("kind-kind", "kind-kind"), ("prod", "prod"), ("ctx3", "ctx3")),
    "namespace": (("tests", "tests"), ("ci-42", "ci-42"), ("a", "a")),
    "image": (("reg.example/agent:1", "reg.example/agent:1"), ("agent:2", "agent:2"), ("x@sha256:0", "x@sha256:0")),
    "service_type": (("NodePort", "NodePort"), ("LoadBalancer", "LoadBalancer"), ("NodePort", "NodePort")),
    "node": (("kind-worker", "kind-worker"), ("node-2.example", "node-2.example"), ("n3", "n3")),
    "bridge": (("br0", "br0"), ("multus-br", "multus-br"), ("br.100", "br.100")),
    "target": (
        ("cnf/app=upf", Target("cnf", selector="app=upf")),
        ("ran/du-0", Target("ran", name="du-0")),
        ("core/tier in (a,b)", Target("core", selector="tier in (a,b)")),
    ),
    "pod_dev": (("net1", "net1"), ("net2", "net2"), ("media0", "media0")),
    "idle_exit": (("60", 60.0), ("3600", 3600.0), ("10", 10.0)),
}

# settings that only make sense with another one: the other is set on the command line too
COMPANIONS: dict[str, dict[str, str]] = {"bridge": {"node": "kind-worker"}}

SCENARIOS = {
    "cli-env-ini": (("cli", "env", "ini"), "cli"),
    "cli-only": (("cli",), "cli"),
    "cli-ini": (("cli", "ini"), "cli"),
    "env-ini": (("env", "ini"), "env"),
    "env-only": (("env",), "env"),
    "ini-only": (("ini",), "ini"),
    "nothing": ((), "default"),
}


def layers_for(
    key: str, present: tuple[str, ...]
) -> tuple[dict[str, str | None], dict[str, str], dict[str, str | None]]:
    cli_v, env_v, ini_v = LAYERS[key]
    cli: dict[str, str | None] = {k: None for k in KEYS}
    env: dict[str, str] = {"PATH": "/usr/bin", "HOME": "/root"}
    ini: dict[str, str | None] = {k: None for k in KEYS}
    if present:
        cli.update(COMPANIONS.get(key, {}))
    if "cli" in present:
        cli[key] = cli_v[0]
    if "env" in present:
        env[ENV[key]] = env_v[0]
    if "ini" in present:
        ini[key] = ini_v[0]
    return cli, env, ini


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize(("present", "winner"), SCENARIOS.values(), ids=SCENARIOS.keys())
def test_precedence(key: str, present: tuple[str, ...], winner: str) -> None:
    config = resolve(*layers_for(key, present))
    cli_v, env_v, ini_v = LAYERS[key]
    expected = {"cli": cli_v[1], "env": env_v[1], "ini": ini_v[1], "default": DEFAULTS[key]}[winner]
    assert getattr(config, key) == expected
    assert type(getattr(config, key)) is type(expected)
    assert config.sources[key] == winner
    for other in KEYS:
        if other != key and other not in COMPANIONS.get(key, {}):
            assert config.sources[other] == "default"
            assert getattr(config, other) == DEFAULTS[other]


@pytest.mark.parametrize("key", [k for k in KEYS if k != "underlay_dev"])
@pytest.mark.parametrize("winner_layer", ["cli", "env"])
def test_lower_layers_are_not_even_parsed(key: str, winner_layer: str) -> None:
    """An invalid value below the winning layer is ignored, not reported."""
    cli, env, ini = layers_for(key, (winner_layer,))
    garbage = "kubernetes" if key == "backend" else "not valid at all"
    env.setdefault(ENV[key], garbage)
    ini[key] = garbage
    config = resolve(cli, env, ini)
    assert config.sources[key] == winner_layer


def test_all_defaults() -> None:
    config = resolve({}, {}, {})
    assert config == TunnelConfig(sources={k: "default" for k in KEYS}, **DEFAULTS)


def test_empty_env_and_ini_fall_through_but_empty_cli_does_not() -> None:
    config = resolve({}, {ENV["port"]: ""}, {"port": ""})
    assert (config.port, config.sources["port"]) == (5533, "default")
    config = resolve({}, {ENV["port"]: ""}, {"port": "7000"})
    assert (config.port, config.sources["port"]) == (7000, "ini")
    with pytest.raises(ConfigError, match="--svctunnel-port=''"):
        resolve({"port": ""}, {}, {})


def test_values_are_stripped() -> None:
    config = resolve({"port": " 6000 "}, {ENV["keep"]: "always\n"}, {"peer": "\t10.0.0.1 "})
    assert (config.port, config.keep, config.peer) == (6000, "always", ipaddress.IPv4Address("10.0.0.1"))


def test_env_is_read_by_its_own_name_only() -> None:
    config = resolve({}, {"PORT": "1", "svctunnel_port": "2", "SVCTUNNEL_VNI": "44"}, {"SVCTUNNEL_PORT": "3"})
    assert (config.port, config.sources["port"]) == (5533, "default")
    assert (config.vni, config.sources["vni"]) == (44, "env")


def test_describe() -> None:
    config = resolve({"port": "6000"}, {ENV["peer"]: "192.0.2.7"}, {"keep": "on-failure"})
    lines = config.describe()
    assert lines == [
        "backend=kubernetes (default)",
        "peer=192.0.2.7 (env)",
        "port=6000 (cli)",
        "vni=333 (default)",
        "ipv4=None (default)",
        "ipv6=None (default)",
        "timeout=60.0 (default)",
        "keep=on-failure (ini)",
        "underlay_dev=None (default)",
        "keepalive=5.0 (default)",
        "misses=3 (default)",
        "reap=False (default)",
        "kubeconfig=None (default)",
        "context=None (default)",
        "namespace=None (default)",
        "image=svctunnel-agent:0.1.0 (default)",
        "service_type=LoadBalancer (default)",
        "node=None (default)",
        "bridge=None (default)",
        "target=None (default)",
        "pod_dev=None (default)",
        "idle_exit=600.0 (default)",
    ]


@pytest.mark.parametrize(
    ("key", "flag", "env", "ini"),
    [(k, FLAG[k], ENV[k], INI[k]) for k in KEYS],
    ids=KEYS,
)
def test_option_names(key: str, flag: str, env: str, ini: str) -> None:
    option = OPTION_BY_KEY[key]
    assert (option.flag, option.env, option.ini) == (flag, env, ini)


def test_option_table_order() -> None:
    assert tuple(o.key for o in OPTIONS) == KEYS


INVALID: dict[str, tuple[str, str, str]] = {
    "port-0": ("port", "0", "outside 1..65535"),
    "port-70000": ("port", "70000", "outside 1..65535"),
    "port-word": ("port", "http", "is not a whole number"),
    "port-float": ("port", "53.5", "is not a whole number"),
    "vni-0": ("vni", "0", "outside 1..16777215"),
    "vni-2**24": ("vni", "16777216", "outside 1..16777215"),
    "timeout-minus-1": ("timeout", "-1", "outside (0, 3600]"),
    "timeout-0": ("timeout", "0", "outside (0, 3600]"),
    "timeout-3601": ("timeout", "3601", "outside (0, 3600]"),
    "timeout-nan": ("timeout", "nan", "outside (0, 3600]"),
    "timeout-word": ("timeout", "soon", "is not a number"),
    "keep-sometimes": ("keep", "sometimes", "choose one of never, on-failure, always"),
    "backend-docker": ("backend", "docker", "choose one of kubernetes, lab"),
    "backend-upper-case": ("backend", "LAB", "choose one of kubernetes, lab"),
    "peer-not-an-ip": ("peer", "not-an-ip", "is not an IP address"),
    "peer-cidr": ("peer", "10.0.0.0/8", "is not an IP address"),
    "keepalive-0": ("keepalive", "0", "outside (0, 3600]"),
    "keepalive-word": ("keepalive", "often", "is not a number"),
    "misses-0": ("misses", "0", "outside 1..100"),
    "misses-101": ("misses", "101", "outside 1..100"),
    "misses-float": ("misses", "2.5", "is not a whole number"),
    "reap-maybe": ("reap", "maybe", "is not true or false"),
    "service-type-cluster-ip": ("service_type", "ClusterIP", "choose one of LoadBalancer, NodePort"),
    "service-type-lower-case": ("service_type", "nodeport", "choose one of LoadBalancer, NodePort"),
    "namespace-upper-case": ("namespace", "Tests", "not a Kubernetes namespace name"),
    "namespace-dot": ("namespace", "a.b", "not a Kubernetes namespace name"),
    "namespace-64": ("namespace", "a" * 64, "not a Kubernetes namespace name"),
    "node-underscore": ("node", "kind_worker", "not a Kubernetes node name"),
    "bridge-16": ("bridge", "b" * 16, "not a Linux interface name"),
    "bridge-slash": ("bridge", "br/0", "not a Linux interface name"),
    "bridge-dot-dot": ("bridge", "..", "not a Linux interface name"),
    "bridge-not-ascii": ("bridge", "brü", "only printable ASCII"),
    "underlay-dev-percent": ("underlay_dev", "eth%d", "not a Linux interface name"),
    "underlay-dev-16": ("underlay_dev", "e" * 16, "not a Linux interface name"),
    "ipv4-a-host": ("ipv4", "10.31.0.1/30", "not a network; give one like 10.30.30.0/30"),
    "ipv4-of-ipv6": ("ipv4", "fd00::/126", "an IPv6 network"),
    "ipv4-too-small": ("ipv4", "10.31.0.0/32", "room for fewer than two addresses"),
    "ipv6-of-ipv4": ("ipv6", "10.31.0.0/30", "an IPv4 network; give one like fd00:3030::/126"),
}


@pytest.mark.parametrize("layer", ["cli", "env", "ini"])
@pytest.mark.parametrize(("key", "raw", "why"), INVALID.values(), ids=INVALID.keys())
def test_invalid_values_name_what_to_fix(key: str, raw: str, why: str, layer: str) -> None:
    cli: dict[str, str | None] = {}
    env: dict[str, str] = {}
    ini: dict[str, str | None] = {}
    if layer == "cli":
        cli[key] = raw
    elif layer == "env":
        env[ENV[key]] = raw
    else:
        ini[key] = raw
    with pytest.raises(ConfigError) as info:
        resolve(cli, env, ini)
    text = str(info.value)
    name = {"cli": FLAG[key], "env": ENV[key], "ini": INI[key]}[layer]
    assert f"fix {'ini ' if layer == 'ini' else ''}{name}" in text
    assert repr(raw) in text
    assert why in text
    others = {FLAG[key], ENV[key], INI[key]} - {name}
    assert not any(other in text for other in others), text


def test_empty_underlay_dev_on_the_command_line() -> None:
    with pytest.raises(ConfigError, match=r"--svctunnel-underlay-dev='' is invalid \(.*it is empty\)"):
        resolve({"underlay_dev": ""}, {}, {})


@pytest.mark.parametrize("layer", ["cli", "env", "ini"])
def test_bridge_needs_node_mode(layer: str) -> None:
    cli: dict[str, str | None] = {"bridge": "br0"} if layer == "cli" else {}
    env = {ENV["bridge"]: "br0"} if layer == "env" else {}
    ini: dict[str, str | None] = {"bridge": "br0"} if layer == "ini" else {}
    with pytest.raises(ConfigError) as info:
        resolve(cli, env, ini)
    text = str(info.value)
    assert "--svctunnel-node NAME" in text
    assert {"cli": FLAG, "env": ENV, "ini": {k: "ini " + v for k, v in INI.items()}}[layer]["bridge"] in text
    assert resolve({**cli, "node": "kind-worker"}, env, ini).bridge == "br0"


def test_node_mode_needs_a_load_balancer() -> None:
    with pytest.raises(ConfigError, match="--svctunnel-node with service type NodePort is not supported"):
        resolve({"node": "n1"}, {ENV["service_type"]: "NodePort"}, {})
    assert resolve({"node": "n1"}, {}, {}).service_type == "LoadBalancer"


@given(st.integers(-(10**6), 10**6))
def test_property_port_range(port: int) -> None:
    if 1 <= port <= 65535:
        assert resolve({"port": str(port)}, {}, {}).port == port
    else:
        with pytest.raises(ConfigError, match="--svctunnel-port"):
            resolve({"port": str(port)}, {}, {})


@given(st.integers(-(2**25), 2**25))
def test_property_vni_range(vni: int) -> None:
    if 1 <= vni <= 0xFFFFFF:
        assert resolve({}, {ENV["vni"]: str(vni)}, {}).vni == vni
    else:
        with pytest.raises(ConfigError, match="SVCTUNNEL_VNI"):
            resolve({}, {ENV["vni"]: str(vni)}, {})


@given(st.fixed_dictionaries({k: st.sets(st.sampled_from(["cli", "env", "ini"])) for k in KEYS}))
def test_property_first_present_layer_wins(present: dict[str, set[str]]) -> None:
    cli: dict[str, str | None] = {}
    env: dict[str, str] = {}
    ini: dict[str, str | None] = {}
    for key, layers in present.items():
        cli_v, env_v, ini_v = LAYERS[key]
        if "cli" in layers:
            cli[key] = cli_v[0]
        if "env" in layers:
            env[ENV[key]] = env_v[0]
        if "ini" in layers:
            ini[key] = ini_v[0]
    if present["target"]:  # pods of a workload: not with the lab or node mode (tested on their own)
        for key in ("backend", "node", "bridge"):
            present[key] = set()
            cli.pop(key, None)
            env.pop(ENV[key], None)
            ini.pop(key, None)
    if present["bridge"] and not present["node"]:
        present["node"] = {"ini"}  # a bridge needs node mode (tested on its own)
        ini["node"] = LAYERS["node"][2][0]
    winner = next((layer for layer in ("cli", "env", "ini") if layer in present["service_type"]), "default")
    if present["node"] and winner in ("cli", "ini"):  # NodePort: not with node mode (tested on its own)
        present["service_type"] = set()
        cli.pop("service_type", None)
        env.pop(ENV["service_type"], None)
        ini.pop("service_type", None)
    config = resolve(cli, env, ini)
    for key, layers in present.items():
        winner = next((layer for layer in ("cli", "env", "ini") if layer in layers), "default")
        assert config.sources[key] == winner
        cli_v, env_v, ini_v = LAYERS[key]
        expected = {"cli": cli_v[1], "env": env_v[1], "ini": ini_v[1], "default": DEFAULTS[key]}[winner]
        assert getattr(config, key) == expected
        assert f"{key}={expected} ({winner})" in config.describe()


def test_target_needs_the_kubernetes_backend_and_no_node_mode() -> None:
    with pytest.raises(ConfigError, match=r"SVCTUNNEL_TARGET needs the kubernetes backend.*--svctunnel-backend lab"):
        resolve({"backend": "lab"}, {ENV["target"]: "cnf/app=upf"}, {})
    with pytest.raises(ConfigError, match="--svctunnel-target and --svctunnel-node exclude each other"):
        resolve({"target": "cnf/app=upf", "node": "kind-worker"}, {}, {})


@pytest.mark.parametrize("raw", ["9", "3601", "-5", "soon"])
def test_idle_exit_bounds(raw: str) -> None:
    with pytest.raises(ConfigError, match=f"--svctunnel-idle-exit='{raw}' is invalid"):
        resolve({"idle_exit": raw}, {}, {})
