"""The ``svctunnel`` command: keygen, agent, connect, goodbye, lab, reap."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import itertools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from . import agentsettings, claims, keys, linkbatch, names
from .agent import run_agent
from .backends.kubernetes.options import DEFAULT_IMAGE, SERVICE_TYPES
from .config import parse_namespace
from .connector import ConnectSettings, ExternalEnd
from .errors import ConfigError, SvcTunnelError
from .goodbye import say_goodbye
from .lab import Lab, lab_runs
from .networks import DEFAULT_VNI, Network, blocks, single_network
from .privileges import AGENT_REMEDY, require_net_admin
from .protocol import DEFAULT_PORT, Endpoint
from .reaper import Reaper
from .runs import Run
from .values import parse_ifname, parse_misses, parse_port, parse_seconds, parse_vni
from .waiting import Deadline

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one clear line on stderr and exit 2, nothing touched."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _argument(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """Turn a ValueError-raising parser from config into an argparse type."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


_port = _argument(parse_port)
_vni = _argument(parse_vni)
_timeout = _argument(parse_seconds)
_misses = _argument(parse_misses)
_dev = _argument(parse_ifname)


def _iface(version: int) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            iface = ipaddress.ip_interface(text)
        except ValueError:
            iface = None
        if iface is None or iface.version != version or "/" not in text:
            example = "10.30.30.2/30" if version == 4 else "fd00:3030::2/126"
            raise argparse.ArgumentTypeError(f"{text!r} is not an IPv{version} address with prefix, like {example}")
        return iface

    return parse


_object_name = _argument(parse_namespace)


def _service(text: str) -> Endpoint:
    host, port = text, str(DEFAULT_PORT)
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDR[:PORT] (IPv6: [ADDR]:PORT)") from None
    try:
        return Endpoint(address, _port(port))
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="svctunnel", description="VXLAN tunnels into Kubernetes through a UDP Service")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("keygen", help="print a new random session key")

    agent = sub.add_parser("agent", help="run the pod end (settings also from SVCTUNNEL_* variables)")
    agentsettings.add_arguments(agent)

    connect = sub.add_parser("connect", help="run the external end in the foreground")
    connect.add_argument("--service", type=_service, required=True, help="Service address ADDR[:PORT]")
    connect.add_argument("--key-file", required=True)
    connect.add_argument("--vni", type=_vni, default=DEFAULT_VNI)
    connect.add_argument(
        "--ipv4", type=_iface(4), help="this end's IPv4 address (default: 10.30.30.2/30, or the next free /30)"
    )
    connect.add_argument(
        "--ipv6", type=_iface(6), help="this end's IPv6 address (default: fd00:3030::2/126, or the next free /126)"
    )
    connect.add_argument("--remote-ipv4", type=_iface(4), help="the pod end's IPv4 address")
    connect.add_argument("--remote-ipv6", type=_iface(6), help="the pod end's IPv6 address")
    connect.add_argument("--dev", type=_dev, help="the device's name (default: the first free of vxlan0, vxlan1, ...)")
    connect.add_argument(
        "--pod-dev", type=_dev, help="the device's name in the pod (default: as --dev if given, else vxlan0)"
    )
    connect.add_argument("--timeout", type=_timeout, default=30.0, help="handshake deadline in seconds")
    connect.add_argument("--underlay-dev", type=_dev)
    connect.add_argument("--keepalive", type=_timeout, default=5.0, help="seconds between keepalives (default 5)")
    connect.add_argument("--misses", type=_misses, default=3, help="missed keepalives before re-handshake (default 3)")

    sidecar = sub.add_parser(
        "sidecar", help="print the YAML of a pod's svctunnel sidecar (its network is there before the application)"
    )
    sidecar.add_argument("--name", type=_object_name, required=True, help="names the Secret, Service and pod label")
    sidecar.add_argument("--namespace", type=_object_name, help="the pod's namespace (default: kubectl's)")
    sidecar.add_argument("--image", default=DEFAULT_IMAGE, help=f"the agent image (default {DEFAULT_IMAGE})")
    sidecar.add_argument("--port", type=_port, default=DEFAULT_PORT)
    sidecar.add_argument("--service-type", choices=SERVICE_TYPES, default="LoadBalancer")
    sidecar.add_argument("--key-file", required=True, help="the session key; a new one is written if it is missing")

    goodbye = sub.add_parser(
        "goodbye", help="end the agent behind a Service: it removes its devices and port filter, then exits"
    )
    goodbye.add_argument("--service", type=_service, required=True, help="Service address ADDR[:PORT]")
    goodbye.add_argument("--key-file", required=True)
    goodbye.add_argument("--timeout", type=_timeout, default=5.0, help="seconds to wait for its answer (default 5)")

    lab = sub.add_parser("lab", help="the built-in lab: namespaces that copy a cluster's network path")
    lab_sub = lab.add_subparsers(dest="lab_command", required=True, parser_class=_Parser)
    up = lab_sub.add_parser("up", help="build a lab and start its agent; prints how to connect")
    up.add_argument("--port", type=_port, default=DEFAULT_PORT)
    up.add_argument("--keep-ports", action="store_true", help="the home router keeps source ports")
    for name in ("down", "status"):
        cmd = lab_sub.add_parser(name, help=f"{name} a lab (all labs when --run is not given)")
        cmd.add_argument("--run", help="the run id printed by 'lab up'")

    reap = sub.add_parser(
        "reap", help="remove what runs that are gone (owner exited, e.g. a killed pytest) left behind"
    )
    reap.add_argument(
        "--include-detached", action="store_true", help="also labs of 'lab up' and kept sessions (like 'lab down')"
    )
    reap.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return int(_COMMANDS[args.command](args))
    except ConfigError as exc:
        print(f"svctunnel: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except SvcTunnelError as exc:
        print(f"svctunnel: {exc}", file=sys.stderr)
        return 1


def _keygen(_args: argparse.Namespace) -> int:
    print(keys.key_text(keys.new_key()))
    return 0


def _agent(args: argparse.Namespace) -> int:
    settings = agentsettings.resolve(vars(args), os.environ)
    require_net_admin("svctunnel agent", AGENT_REMEDY)
    return run_agent(settings)


class _Stop(BaseException):
    """Raised from a SIGTERM/SIGINT handler; unwinds through every cleanup step."""


def _raise_stop(_signum: int, _frame: object) -> None:
    raise _Stop


def _connect(args: argparse.Namespace) -> int:
    key = keys.read_key_file(args.key_file)
    single_network(args.dev or "vxlan0", args.vni, args.ipv4, args.ipv6, args.remote_ipv4, args.remote_ipv6)
    require_net_admin("svctunnel connect")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _raise_stop)
    run: Run | None = None
    try:
        run = Run.new()  # what it claims (device, addresses) is on record while it runs, for other runs
        return _connect_as(run, args, key)
    except _Stop:  # before the tunnel was up
        return 130
    finally:
        if run is not None:
            run.remove()


def _connect_as(run: Run, args: argparse.Namespace, key: bytes) -> int:
    group = linkbatch.new_group()
    net = claims.claim(run, lambda others: _connect_network(args, others), lambda net: _connect_claim(net, group))
    settings = ConnectSettings(args.service, key, (net,), args.timeout, args.underlay_dev, args.keepalive, args.misses)
    end = ExternalEnd(settings, group=group)
    signal.signal(
        signal.SIGUSR1, lambda *_: logging.getLogger("svctunnel.connect").info("status: %s", end.status.render())
    )
    ready = False
    try:
        conn = end.open()
        ready = True  # before the line: a stop right after it is a clean stop of a ready tunnel
        built = conn.networks[0]
        addrs = ",".join(str(a) for a in (built.local_ipv4, built.local_ipv6) if a)
        remote = ",".join(str(a) for a in (built.remote_ipv4, built.remote_ipv6) if a)
        print(
            f"ready dev={built.dev} vni={built.vni} mtu={built.mtu} local={addrs} remote={remote} "
            f"service={conn.service} peer={conn.peer} port={conn.local.port}",
            flush=True,
        )
        while True:
            signal.pause()
    except _Stop:
        logging.getLogger("svctunnel.connect").info("stopping: removing %s", net.dev)
    finally:
        end.close()
    return 0 if ready else 130


def _connect_network(args: argparse.Namespace, others: claims.Others) -> Network:
    """The network of ``connect``: the device and addresses given, unless another run holds them; else
    free ones (``vxlan0``, ``vxlan1``, ...; the first free blocks)."""
    taken = set(others.links) | set(others.devices)
    dev = args.dev or next(name for i in itertools.count() if (name := f"vxlan{i}") not in taken)
    if dev in others.devices:
        raise ConfigError(f"device {dev} is held by {others.devices[dev]}: choose another --dev, or leave it out")
    if dev in others.links and not others.leftover(dev):  # a killed run's device is made anew
        raise ConfigError(
            f"a link named {dev} already exists on this host and is not a tunnel device svctunnel made: choose"
            " another --dev, or leave it out"
        )
    held = others.except_on(dev)
    net = single_network(dev, args.vni, args.ipv4, args.ipv6, args.remote_ipv4, args.remote_ipv6, held)
    return dataclasses.replace(net, pod_dev=args.pod_dev or args.dev or "vxlan0")  # the pod's name stays vxlan0


def _connect_claim(net: Network, group: int) -> claims.Claim:
    return claims.Claim(tuple(blocks([net])), (net.dev,), group, f"svctunnel connect, pid {os.getpid()}")


def _sidecar(args: argparse.Namespace) -> int:
    from .backends.kubernetes.sidecar import render_for_manifests

    path = Path(args.key_file)
    if not path.exists():
        keys.write_key_file(path, keys.new_key())
    key = keys.read_key_file(args.key_file)
    print(render_for_manifests(args.name, args.namespace, args.image, keys.key_text(key), args.port, args.service_type))
    return 0


def _goodbye(args: argparse.Namespace) -> int:
    key = keys.read_key_file(args.key_file)
    if say_goodbye(args.service, key, Deadline.after(args.timeout)):
        print(f"the agent behind {args.service} removed everything and exits")
        return 0
    print(
        f"svctunnel: no goodbye back from {args.service} within {args.timeout:g} s: the agent is gone already,"
        " the key is not its key, or the Service does not forward to it",
        file=sys.stderr,
    )
    return 1


def _lab(args: argparse.Namespace) -> int:
    wanted = getattr(args, "run", None)
    if wanted and not (names.RUN_ID.fullmatch(wanted) and (Run.existing(wanted).dir / "lab.json").exists()):
        raise ConfigError(f"no lab with run id {wanted}; 'svctunnel lab status' lists them")
    require_net_admin("svctunnel lab")
    if args.lab_command == "up":
        run = Run.new()
        lab = Lab(run, port=args.port, rewrite_ports=not args.keep_ports)
        try:
            lab.up()
            lab.start_agent(keys.new_key())
        except BaseException:
            lab.down()
            run.remove()
            raise
        lab.agent.detach()  # the agent outlives this command; 'lab down' stops it by its pid
        run.detach()  # and so does the run: 'svctunnel reap' leaves it to 'lab down'
        print(lab.status())
        print(f"connect: svctunnel connect --service {lab.plan.service(4)} --key-file {lab.agent.key_file}")
        print(f"remove:  svctunnel lab down --run {run.id}")
        return 0
    runs = [Run.existing(args.run)] if args.run else list(lab_runs())
    for run in runs:
        lab = Lab(run)
        if args.lab_command == "status":
            print(lab.status())
        else:
            lab.down()
            run.remove()
            print(f"removed lab {run.id}")
    if not runs:
        print("no labs")
    return 0


def _reap(args: argparse.Namespace) -> int:
    if not args.dry_run:
        require_net_admin("svctunnel reap")
    report = Reaper(include_detached=args.include_detached).run(dry_run=args.dry_run)
    for line in report.lines():
        print(line)
    return 1 if report.failed else 0


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "keygen": _keygen,
    "sidecar": _sidecar,
    "agent": _agent,
    "connect": _connect,
    "goodbye": _goodbye,
    "lab": _lab,
    "reap": _reap,
}
