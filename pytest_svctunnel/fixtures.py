"""The plugin's fixtures: thin shells over ``TunnelSession``."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

import pytest

from .errors import SvcTunnelError
from .networks import Network
from .stash import STASH

if TYPE_CHECKING:
    from .session import Tunnel


@pytest.fixture(scope="session")
def svctunnel(request: pytest.FixtureRequest) -> Iterator[Tunnel]:
    """Session scope. Deploys the pod end through the selected backend, runs the
    handshake, builds this end's devices and yields a ``Tunnel``: the default
    network's ``dev``, ``vni``, ``local_ipv4``, ``local_ipv6``, ``remote_ipv4``,
    ``remote_ipv6``; ``networks`` (name -> Network, with "default" and every
    ``svctunnel_network`` mark of the session); ``service_address``; and ``peer``,
    the address and port the pod end learned. Teardown removes everything it made."""
    state = request.config.stash[STASH]
    if state.error is not None:
        raise pytest.UsageError(str(state.error))
    assert state.config is not None
    from .session import TunnelSession  # netlink and the backends load only when a tunnel is wanted

    session = TunnelSession(state.config, state.networks, state.run_id)
    state.session = session
    failure: SvcTunnelError | None = None
    try:
        tunnel = session.start()
    except SvcTunnelError as exc:
        failure = exc
    if failure is not None:  # outside the except: the report shows our line, not a chained traceback
        pytest.fail(f"svctunnel: {failure}", pytrace=False)
    state.setup_note = f"tunnel ready in {session.stopwatch.render()}"
    yield tunnel
    note = session.stop(failed=request.session.testsfailed > 0)
    if note:
        state.kept_note = note


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
