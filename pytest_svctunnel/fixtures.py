"""The plugin's fixtures: thin shells over ``TunnelSession``."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pytest

from .errors import ConfigError, SvcTunnelError
from .names import new_run_id
from .networks import ATTACH, Network, NetworkRequest, parse_request, session_plan
from .stash import STASH, PluginStash
from .targets import Target, parse_target
from .waiting import Stopwatch

if TYPE_CHECKING:
    from .attachments import Attachment, Sidecar
    from .session import Tunnel, TunnelSession

AttachNetworks = str | Sequence[str] | Mapping[str, Mapping[str, Any]]


def _tunnel_session(request: pytest.FixtureRequest) -> tuple[PluginStash, TunnelSession]:
    """The session's one ``TunnelSession`` (the tunnel and every attachment share its run)."""
    state = request.config.stash[STASH]
    if state.error is not None:
        raise pytest.UsageError(str(state.error))
    assert state.config is not None
    if state.session is None:
        stopwatch = Stopwatch()  # the setup's time starts here, loading the modules included
        from .session import TunnelSession  # netlink and the backends load only when a tunnel is wanted

        # an xdist worker's attachments and sidecars are its own (a run of their own); the marks'
        # networks are the run's, shared by every worker (see ``_shared_tunnel``)
        run_id = new_run_id() if state.role == "worker" else state.run_id
        plan = state.plan if state.plan is not None and state.role != "worker" else session_plan(state.config, run_id)
        state.session = TunnelSession(state.config, plan, run_id, stopwatch=stopwatch)
    return state, state.session


@pytest.fixture(scope="session")
def svctunnel(request: pytest.FixtureRequest) -> Iterator[Tunnel]:
    """Session scope. Deploys the pod end through the selected backend, runs the
    handshake, builds this end's devices and yields a ``Tunnel``: the default
    network's ``dev``, ``vni``, ``local_ipv4``, ``local_ipv6``, ``remote_ipv4``,
    ``remote_ipv6``; ``networks`` (name -> Network, with "default" and every
    ``svctunnel_network`` mark of the session); ``service_address``; and ``peer``,
    the address and port the pod end learned. Teardown removes everything it made.
    Under pytest-xdist every worker gets the one tunnel the first of them had built."""
    state = request.config.stash[STASH]
    if state.role == "worker" and state.error is None:
        yield _shared_tunnel(state)
        return
    state, session = _tunnel_session(request)
    failure: SvcTunnelError | None = None
    try:
        tunnel = session.start()
    except SvcTunnelError as exc:
        failure = exc
    if failure is not None:  # outside the except: the report shows our line, not a chained traceback
        pytest.fail(f"svctunnel: {failure}", pytrace=False)
    state.setup_note = f"tunnel ready in {session.stopwatch.render()}; {tunnel.describe_path()}"
    yield tunnel
    started = time.monotonic()
    note = session.stop(failed=request.session.testsfailed > 0)
    if note:
        state.kept_note = note
    else:
        state.teardown_note = f"tunnel removed in {time.monotonic() - started:.2f} s"


def _shared_tunnel(state: PluginStash) -> Tunnel:
    """In an xdist worker: the run's tunnel, built once by its keeper (see ``shared``)."""
    from . import shared
    from .runs import Run

    assert state.config is not None
    failure: SvcTunnelError | None = None
    try:
        run = Run.existing(state.run_id)
        state.shared_run = run
        built = shared.attach(run, state.config, state.plan or session_plan(state.config, state.run_id))
    except SvcTunnelError as exc:
        failure = exc
    if failure is not None:
        pytest.fail(f"svctunnel: {failure}", pytrace=False)
    return built.tunnel


@pytest.fixture(scope="session")
def svctunnel_networks(svctunnel: Tunnel) -> Mapping[str, Network]:
    """Session scope. Every network of the session by name, "default" included."""
    return svctunnel.networks


@pytest.fixture
def svctunnel_network(request: pytest.FixtureRequest, svctunnel: Tunnel) -> Network:
    """Function scope. The network named by the test's closest ``svctunnel_network`` mark."""
    mark = request.node.get_closest_marker("svctunnel_network")
    if mark is None:
        pytest.fail(
            "the svctunnel_network fixture needs a @pytest.mark.svctunnel_network(NAME) mark on the test",
            pytrace=False,
        )
    name = mark.args[0] if mark.args else mark.kwargs.get("name")
    return svctunnel.networks[str(name)]


@pytest.fixture(scope="session")
def svctunnel_attach(request: pytest.FixtureRequest) -> Callable[..., Attachment]:
    """Session scope. A factory for networks into pods your own fixtures create during the session:
    ``svctunnel_attach(target, networks=("net1",))`` injects the agent into every pod of ``target``
    (``NAMESPACE/SELECTOR`` or ``NAMESPACE/NAME``, the pods must be Running) and returns an
    ``Attachment``: ``.networks`` by name, ``.networks.pods(name)`` by pod, ``.tunnels`` by pod.
    ``networks`` lists network names (each is also its device name in the pod), or maps each name to
    the marker's settings (``ipv4``, ``ipv6``, ``vni``, ``pod_dev``). Use it as a context manager,
    or let the session's end remove it."""
    state, session = _tunnel_session(request)

    def attach(target: str | Target, networks: AttachNetworks = ("net1",)) -> Attachment:
        failure: SvcTunnelError | None = None
        try:
            parsed, requests = _attach_request(target, networks)
            attachment = session.attach(parsed, requests)
        except SvcTunnelError as exc:
            failure = exc
        if failure is not None:
            pytest.fail(f"svctunnel_attach: {failure}", pytrace=False)
        state.attach_notes.append(f"attached to {parsed} in {attachment.stopwatch.render()}")
        return attachment

    return attach


@pytest.fixture(scope="session")
def svctunnel_sidecar(request: pytest.FixtureRequest) -> Callable[..., Sidecar]:
    """Session scope. A factory for pods whose application must find its interfaces at start:
    ``svctunnel_sidecar(namespace, networks=("net1",))`` creates the Secret and the Service and
    returns a ``Sidecar``: put ``.container`` into the pod's ``initContainers`` and ``.labels`` into
    its labels, create the pod, then ``.wait()`` returns once the tunnel is up (the kubelet starts
    the pod's main containers only then). ``networks`` as for ``svctunnel_attach``. One pod per
    sidecar; a context manager, or removed at the session's end (the pod is yours to delete)."""
    state, session = _tunnel_session(request)

    def sidecar(namespace: str, networks: AttachNetworks = ("net1",)) -> Sidecar:
        failure: SvcTunnelError | None = None
        try:
            target, requests = _attach_request(f"{namespace}/svctunnel-sidecar", networks)
            made = session.sidecar(target.namespace, requests)
        except SvcTunnelError as exc:
            failure = exc
        if failure is not None:
            pytest.fail(f"svctunnel_sidecar: {failure}", pytrace=False)
        state.late_notes.append(
            lambda: f"sidecar in {namespace} ready in {made.stopwatch.render()}" if made.ready else None
        )
        return made

    return sidecar


def _attach_request(target: str | Target, networks: AttachNetworks) -> tuple[Target, list[NetworkRequest]]:
    where = ATTACH
    try:
        parsed = target if isinstance(target, Target) else parse_target(str(target))
    except ValueError as exc:
        raise ConfigError(f"{where}: target {exc}") from None
    if isinstance(networks, str):
        networks = (networks,)
    items = list(networks.items()) if isinstance(networks, Mapping) else [(name, {}) for name in networks]
    if not items:
        raise ConfigError(f"{where}: give at least one network name, e.g. networks=('net1',)")
    requests = []
    for name, given in items:
        unknown = set(given) - {"ipv4", "ipv6", "vni", "pod_dev"}
        if unknown:
            raise ConfigError(
                f"{where}: network {name!r} has unknown settings {', '.join(sorted(unknown))}; use"
                " ipv4, ipv6, vni, pod_dev"
            )
        g = given.get
        pod_dev = g("pod_dev") or name  # a network's name is its device name in the pod, unless pod_dev says other
        requests.append(parse_request(name, g("ipv4"), g("ipv6"), g("vni"), where, parsed, pod_dev))
    return parsed, requests
