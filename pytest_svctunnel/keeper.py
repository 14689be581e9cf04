"""The keeper of an xdist run's shared tunnel: ``python -m pytest_svctunnel.keeper RUN_DIR``.

Started by the first worker that needs the tunnel (``shared``), in a session of its own. It builds
the tunnel from the worker's settings and plan, records it for every worker, and holds it (the
keepalives run here) until the controller sends SIGTERM after the last worker finished, or until
the controller is gone; then it tears everything down, or keeps it as --svctunnel-keep says.
"""

from __future__ import annotations

import logging
import pickle
import sys
import time
from pathlib import Path

from . import interrupts, shared
from .errors import SvcTunnelError
from .runs import Run
from .session import TunnelSession
from .shield import shield

log = logging.getLogger("svctunnel.keeper")
_OWNER_POLL_S = 0.25


def main(argv: list[str]) -> int:
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_dir = Path(argv[0])
    run = Run(run_dir.name, run_dir)
    interrupts.guard_forks()
    interrupts.install()  # SIGTERM from the controller: KeyboardInterrupt, as Ctrl-C
    config, plan = pickle.loads((run_dir / shared.KEEPER_INPUT).read_bytes())
    session = TunnelSession(config, plan, run.id, run=run)
    try:
        tunnel = session.start()
    except SvcTunnelError as exc:
        shared.record_failure(run, str(exc), session.diagnostics())
        log.error("could not build the shared tunnel: %s", exc)
        return 1
    except KeyboardInterrupt:  # stopped during setup: start() undid it all
        shared.record_done(run, None, session.teardown_failed)
        return 130
    shared.record_built(run, shared.Built(tunnel, session.stopwatch.render()))
    log.info("shared tunnel of run %s ready in %s", run.id, session.stopwatch.render())
    owner = run.owner()
    try:
        while owner is None or owner.process.alive():
            time.sleep(_OWNER_POLL_S)
        log.warning("the controller (%s) is gone: tearing down", owner.process.describe())
    except KeyboardInterrupt:
        log.info("stopping: the controller says the session is over")
    with shield():
        note = session.stop(failed=shared.finish_says_failed(run))
        if note:
            run.detach()  # 'svctunnel reap' leaves it to --include-detached
        shared.record_done(run, note, session.teardown_failed)
        if owner is not None and not owner.process.alive() and not note and not session.teardown_failed:
            run.remove()  # nobody is left to remove it
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
