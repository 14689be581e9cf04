"""The agent's settings: the one contract between whoever starts ``svctunnel agent`` and the agent.

One typed object (``AgentSettings``), one way to write it (``to_argv`` for a process the lab
starts, ``to_env`` for a container's environment), and one parser (``resolve``: flags first,
then ``SVCTUNNEL_*`` variables, then defaults). The key never travels in either: a key file
(``--key-file``) or a Secret (``SVCTUNNEL_KEY``) carries it.

The lab starts its agent with every ``SVCTUNNEL_*`` variable removed from the environment
(``clean_environment``), so the external end's settings never leak into the pod end.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from . import keys
from .errors import ConfigError
from .guard import DEFAULT_MAX_SKEW_S
from .protocol import DEFAULT_PORT
from .values import IPAddress, parse_address, parse_bool, parse_ifname, parse_port, parse_seconds, parse_text

ENV_PREFIX = "SVCTUNNEL_"
KEY_FILE_ENV = "SVCTUNNEL_KEY_FILE"
KEY_ENV = "SVCTUNNEL_KEY"


@dataclass(frozen=True)
class AgentSettings:
    """What ``svctunnel agent`` runs with."""

    key: bytes = field(repr=False)
    port: int = DEFAULT_PORT
    peer: IPAddress | None = None  # accept hellos only from this address
    underlay_dev: str | None = None  # the device hellos arrive on and tunnels use
    max_skew: float = DEFAULT_MAX_SKEW_S  # seconds
    ready_file: Path | None = None  # exists while the tunnel is up (a readiness probe tests it)
    bridge: str | None = None  # every network's device joins this Linux bridge
    # the address hellos are DNATed to (the pod IP; the node's, with hostNetwork), for replies
    # to hellos seen before the node's DNAT, addressed to the Service
    local_address: IPAddress | None = None
    host_network: bool = False  # runs in the node's own namespace (node mode)
    # remove everything and exit after this many seconds without a word from a peer (None: never);
    # an agent injected into someone else's pod must not outlive a test session that was killed
    idle_exit: float | None = None
    # the namespace belongs to an application (an injected agent): the agent never takes over a
    # link or a port filter it did not create
    shared_netns: bool = False
    # a goodbye removes the networks but the agent goes on waiting for hellos (a sidecar, which the
    # kubelet would restart, and whose pod belongs to someone else)
    stay_after_goodbye: bool = False


@dataclass(frozen=True)
class _Setting:
    """One field of AgentSettings as a flag and an environment variable."""

    name: str
    parse: Callable[[str], Any]
    help: str
    boolean: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    def write(self, value: Any) -> str:
        return ("true" if value else "false") if self.boolean else str(value)


SETTINGS: tuple[_Setting, ...] = (
    _Setting("port", parse_port, "UDP port to listen on"),
    _Setting("peer", parse_address, "accept hellos only from this address"),
    _Setting("underlay_dev", parse_ifname, "device hellos arrive on and tunnels use"),
    _Setting("max_skew", parse_seconds, "accepted clock difference in seconds"),
    _Setting("ready_file", lambda text: Path(parse_text(text)), "a file that exists while the tunnel is up"),
    _Setting("bridge", parse_ifname, "every network's device joins this Linux bridge"),
    _Setting("local_address", parse_address, "the pod's address, for hellos seen before the node's DNAT"),
    _Setting("host_network", parse_bool, "the agent runs in the node's own network namespace", boolean=True),
    _Setting("idle_exit", parse_seconds, "remove everything and exit after this long without a word from a peer"),
    _Setting(
        "shared_netns",
        parse_bool,
        "the network namespace is an application's: never take over a link or port filter found there",
        boolean=True,
    ),
    _Setting(
        "stay_after_goodbye",
        parse_bool,
        "a goodbye removes the networks, and the agent waits for a new hello instead of exiting",
        boolean=True,
    ),
)
_DEFAULTS = {f.name: f.default for f in fields(AgentSettings) if f.name != "key"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The agent's flags on ``parser``; each defaults to None, so ``resolve`` sees what was given."""
    parser.add_argument("--key-file", help=f"key file [{KEY_FILE_ENV}; or the key itself in {KEY_ENV}]")
    for setting in SETTINGS:
        default = _DEFAULTS[setting.name]
        shown = f"; default {default}" if default not in (None, False) else ""
        text = f"{setting.help} [{setting.env}{shown}]"
        if setting.boolean:
            parser.add_argument(setting.flag, dest=setting.name, action="store_const", const="true", help=text)
        else:
            parser.add_argument(setting.flag, dest=setting.name, metavar=setting.name.upper(), help=text)


def resolve(flags: Mapping[str, Any], environ: Mapping[str, str]) -> AgentSettings:
    """Settings from flags (``argparse`` values named like the fields), else the environment, else
    defaults. A bad value is a ConfigError naming the flag or variable it came from."""
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        given, where = flags.get(setting.name), setting.flag
        if given is None and environ.get(setting.env):
            given, where = environ[setting.env], setting.env
        if given is None:
            continue
        try:
            values[setting.name] = setting.parse(str(given).strip())
        except ValueError as exc:
            raise ConfigError(f"{where}={given!r} is invalid ({exc}); fix {where}") from None
    return AgentSettings(key=_key(flags.get("key_file"), environ), **values)


def _key(key_file: str | None, environ: Mapping[str, str]) -> bytes:
    if key_file:
        return keys.read_key_file(key_file)
    if environ.get(KEY_FILE_ENV):
        return keys.read_key_file(environ[KEY_FILE_ENV])
    if environ.get(KEY_ENV):
        return keys.parse_key(environ[KEY_ENV], KEY_ENV)
    raise ConfigError(f"no key: give --key-file, or set {KEY_FILE_ENV} or {KEY_ENV}")


def _given(settings: AgentSettings) -> list[tuple[_Setting, Any]]:
    """The settings that differ from the defaults, in table order."""
    return [(s, getattr(settings, s.name)) for s in SETTINGS if getattr(settings, s.name) != _DEFAULTS[s.name]]


def to_argv(settings: AgentSettings, key_file: Path) -> list[str]:
    """Flags for ``svctunnel agent`` that ``resolve`` turns back into ``settings``; the key must be
    in ``key_file`` already."""
    argv = ["--key-file", str(key_file)]
    for setting, value in _given(settings):
        argv += [setting.flag] if setting.boolean else [setting.flag, setting.write(value)]
    return argv


def to_env(settings: AgentSettings) -> dict[str, str]:
    """``SVCTUNNEL_*`` variables that ``resolve`` turns back into ``settings``, but for the key,
    which the caller delivers as ``SVCTUNNEL_KEY`` (from a Secret) or a key file."""
    return {setting.env: setting.write(value) for setting, value in _given(settings)}


def clean_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without any ``SVCTUNNEL_*`` variable: for an agent whose settings are all flags."""
    return {name: value for name, value in environ.items() if not name.startswith(ENV_PREFIX)}


def describe(settings: AgentSettings) -> str:
    """The settings in one line, for the agent's first log line (never the key)."""
    return " ".join(f"{s.flag.lstrip('-')}={getattr(settings, s.name)}" for s in SETTINGS)
