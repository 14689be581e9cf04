"""pytest hooks only: options, markers, collection, report header and sections, and clean stops
(SIGTERM stops pytest like Ctrl-C; --svctunnel-reap at session start; a last teardown at the end)."""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Generator

import pytest

from . import interrupts, workers
from .config import OPTIONS, resolve
from .errors import ConfigError, SvcTunnelError
from .fixtures import svctunnel, svctunnel_attach, svctunnel_network, svctunnel_networks, svctunnel_sidecar
from .names import new_run_id
from .networks import NetworkRequest, check_targets_need_a_cluster, parse_request, session_plan
from .runs import Run
from .shield import shield
from .stash import STASH, PluginStash

__all__ = ["svctunnel", "svctunnel_attach", "svctunnel_network", "svctunnel_networks", "svctunnel_sidecar"]

MARKER = "svctunnel_network"
TUNNEL_FIXTURES = frozenset(
    {"svctunnel", "svctunnel_network", "svctunnel_networks", "svctunnel_attach", "svctunnel_sidecar"}
)
_MARKER_USAGE = f"{MARKER}(name, *, ipv4=None, ipv6=None, vni=None, target=None, pod_dev=None)"
_MARKER_DOC = (
    f"{_MARKER_USAGE}: ask for an extra tunnel network built in the same session; ipv4/ipv6 are"
    " networks like '10.40.0.0/30' (pod end takes the first host, this end the second), False to leave"
    " a family out; defaults are deterministic and non-overlapping. target='NAMESPACE/SELECTOR' or"
    " 'NAMESPACE/NAME' puts the network into those pods of your workload (each pod its own), pod_dev"
    " names its device there (e.g. 'net1')."
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("svctunnel", "extra networks into Kubernetes through a UDP Service")
    for option in OPTIONS:
        default = f"; default {option.default}" if option.default else ""
        group.addoption(
            option.flag,
            dest=f"svctunnel_{option.key}",
            default=None,
            metavar=option.key.upper(),
            help=f"{option.help} [env {option.env}, ini {option.ini}{default}]",
        )
        parser.addini(option.ini, help=option.help, type="string", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER_DOC)
    shared_run = workers.worker_run_id(config)  # an xdist worker shares its controller's run
    state = PluginStash(run_id=shared_run or new_run_id())
    state.role = "worker" if shared_run else "controller" if workers.is_controller(config) else "single"
    config.stash[STASH] = state
    cli = {o.key: config.getoption(f"svctunnel_{o.key}") for o in OPTIONS}
    ini = {o.key: str(config.getini(o.ini) or "") or None for o in OPTIONS}
    try:
        state.config = resolve(cli, os.environ, ini)
    except ConfigError as exc:
        state.error = exc
        if not (config.option.help or config.option.markers or getattr(config.option, "version", False)):
            raise pytest.UsageError(f"svctunnel: {exc}") from None
    if state.role == "controller" and state.config is not None:
        config.pluginmanager.register(workers.Controller(state), _CONTROLLER)
    _stop_like_ctrl_c(config)


_CONTROLLER = "svctunnel-xdist-controller"


_INTERRUPT_HANDLERS = pytest.StashKey[dict[int, interrupts.InterruptThisProcess]]()


def _stop_like_ctrl_c(config: pytest.Config) -> None:
    """SIGTERM (by default fatal without teardown) stops pytest like Ctrl-C, and no Ctrl-C,
    SIGTERM or pytest-timeout alarm is lost in a fork; see interrupts.py."""
    interrupts.guard_forks()
    config.stash[_INTERRUPT_HANDLERS] = interrupts.install()
    config.pluginmanager.register(interrupts.InterruptReport(config), "svctunnel-interrupt-report")


def pytest_unconfigure(config: pytest.Config) -> None:
    interrupts.restore(config.stash.get(_INTERRUPT_HANDLERS, {}))


def pytest_sessionstart(session: pytest.Session) -> None:
    """--svctunnel-reap: remove what runs that are gone left behind, one terminal line per run."""
    state = session.config.stash.get(STASH, None)
    if state is None or state.config is None or not state.config.reap:
        return
    from .reaper import reap_for_session  # netlink loads only when reaping is asked for

    for line in reap_for_session(state.config.timeout):
        _write_line(session.config, f"svctunnel: {line}")


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_sessionfinish(session: pytest.Session) -> Generator[None, None, None]:
    """After every teardown, also one that a signal cut short (or that never started because a
    signal came between the tunnel's setup and the fixture's yield): stop the session's tunnel
    if it still stands, and mark a kept run detached so 'svctunnel reap' leaves it alone."""
    try:
        return (yield)
    finally:
        _finish_run(session)


def _finish_run(session: pytest.Session) -> None:
    state = session.config.stash.get(STASH, None)
    if state is not None and state.role == "controller":
        _finish_shared(session, state)
    if state is None or state.session is None:
        return
    tunnel_session, state.session = state.session, None
    with shield():
        try:
            note = tunnel_session.stop(failed=session.testsfailed > 0)  # a no-op after a full teardown
        except Exception as exc:  # the last chance to say it; the run stays for 'svctunnel reap'
            _write_line(session.config, f"svctunnel: removing the tunnel failed: {exc}; run 'svctunnel reap'")
            return
        try:
            run = Run.existing(tunnel_session.run_id)
        except SvcTunnelError as exc:  # e.g. a state root this user cannot use: the setup said so already
            _write_line(session.config, f"svctunnel: {exc}")
            return
        if not run.dir.is_dir():
            return
        if note:
            state.kept_note = state.kept_note or note
            run.detach()
        elif not tunnel_session.teardown_failed:
            run.remove()  # a stop cut short right after creating the run left only this directory


def _finish_shared(session: pytest.Session, state: PluginStash) -> None:
    """The xdist controller, after the last worker: the workers' usage errors, then the end of the
    shared tunnel (its keeper tears it down, or keeps it) and its notes, once."""
    controller = session.config.pluginmanager.get_plugin(_CONTROLLER)
    for error in getattr(controller, "errors", ()):
        _write_line(session.config, f"ERROR: {error}")
        session.exitstatus = pytest.ExitCode.USAGE_ERROR
    try:
        run = Run.existing(state.run_id)
    except SvcTunnelError:
        return
    if state.config is None or not run.dir.is_dir():
        return
    from . import shared  # pickle and subprocess load only here

    with shield():
        note, started = shared.setup_note(run), time.monotonic()
        stopped = shared.stop(run, session.testsfailed > 0, state.config)
        if stopped is not None and not stopped.kept:
            state.teardown_note = f"tunnel removed in {time.monotonic() - started:.2f} s"
        if note:
            state.setup_note = f"tunnel ready in {note} (shared by every xdist worker)"
        if stopped is not None and stopped.kept:
            state.kept_note = stopped.kept
        elif stopped is not None and stopped.teardown_failed:
            _write_line(session.config, "svctunnel: removing the shared tunnel failed; run 'svctunnel reap'")
        else:
            run.remove()


def _write_line(config: pytest.Config, line: str) -> None:
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(line)


def pytest_report_header(config: pytest.Config) -> list[str]:
    state = config.stash.get(STASH, None)
    if state is None or state.config is None:
        return []
    return [f"svctunnel: run {state.run_id}; " + ", ".join(state.config.describe())]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    state = config.stash[STASH]
    if state.config is None:
        return
    requests: list[NetworkRequest] = []
    try:
        for item in items:
            for mark in item.iter_markers(MARKER):
                requests.append(_request(mark, item.nodeid))
        state.plan = session_plan(state.config, state.run_id, requests)
        state.networks = state.plan.networks()
        check_targets_need_a_cluster(state.networks, state.config.backend)
        _warm_the_client(state, items)
    except ConfigError as exc:
        if state.role == "worker":  # a UsageError would crash the worker: the controller reports it
            workers.report_to_controller(config, f"svctunnel: {exc}")
            items.clear()
            return
        raise pytest.UsageError(f"svctunnel: {exc}") from None


def _warm_the_client(state: PluginStash, items: list[pytest.Item]) -> None:
    """A session that will build a tunnel: load the tunnel's modules (netlink) now, in a thread,
    while pytest goes on, and for a cluster also import and configure its client (half a second
    off the tunnel's setup). Not in an xdist worker: its keeper builds the tunnel."""
    cfg = state.config
    if cfg is None or state.role == "worker":
        return
    if not any(TUNNEL_FIXTURES & set(getattr(item, "fixturenames", ())) for item in items):
        return
    session = f"{__package__}.session"
    if cfg.backend == "kubernetes":
        from .backends.kubernetes import warm

        warm.prepare(cfg.kubeconfig, cfg.context, preload=(session,))
    else:
        threading.Thread(target=importlib.import_module, args=(session,), name="svctunnel-warm", daemon=True).start()


def _request(mark: pytest.Mark, where: str) -> NetworkRequest:
    kwargs = dict(mark.kwargs)
    unknown = set(kwargs) - {"name", "ipv4", "ipv6", "vni", "target", "pod_dev"}
    if unknown or len(mark.args) > 1 or (mark.args and "name" in kwargs):
        raise ConfigError(
            f"{MARKER} mark on {where}: use {_MARKER_USAGE}"
            + (f"; unknown {', '.join(sorted(unknown))}" if unknown else "")
        )
    name = mark.args[0] if mark.args else kwargs.get("name")
    g = kwargs.get
    return parse_request(name, g("ipv4"), g("ipv6"), g("vni"), where, g("target"), g("pod_dev"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    state = item.config.stash.get(STASH, None)
    uses_tunnel = TUNNEL_FIXTURES & set(getattr(item, "fixturenames", ()))
    if report.failed and uses_tunnel and state is not None and state.session is not None:
        report.sections.append(("svctunnel diagnostics", state.session.diagnostics()))
    elif report.failed and uses_tunnel and state is not None and state.shared_run is not None:
        from .shared import diagnostics

        report.sections.append(("svctunnel diagnostics", diagnostics(state.shared_run)))
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    state = config.stash.get(STASH, None)
    if state is None:
        return
    late = [note() for note in state.late_notes]
    for note in (state.setup_note, *state.attach_notes, *late, state.teardown_note, state.kept_note):
        if note:
            terminalreporter.write_line(f"svctunnel: {note}")
