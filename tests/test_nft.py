"""nft refused for want of a capability says which one, and where to add it."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.root

WITHOUT_CAPABILITIES = """
from pytest_svctunnel import nft
from pytest_svctunnel.errors import KernelError
try:
    nft.apply("table inet svtcheck\\ndelete table inet svtcheck\\n")
except KernelError as exc:
    print(exc)
"""


def test_nft_without_net_admin_names_the_capability() -> None:
    """A real nft run by root with every capability dropped (as runc runs an agent without NET_ADMIN)."""
    argv = ["setpriv", "--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--"]
    done = subprocess.run([*argv, sys.executable, "-c", WITHOUT_CAPABILITIES], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    message = done.stdout.strip()
    assert "nft was refused" in message and "Operation not permitted" in message, message
    assert "CAP_NET_ADMIN" in message and "securityContext.capabilities" in message, message
    assert "\n" not in message and "table inet svtcheck" not in message, "one line, without the ruleset"
