"""An unprivileged user meets the plugin, ``svctunnel reap`` and ``svctunnel lab``: whatever state
directories exist (none yet, root's, a per-user one another user made), each says what to do in one
line and never shows a traceback; the user's own state root is used and left clean.

The inner runs are real processes of a real unprivileged user (uid 65534, no capabilities, no
groups; ``setpriv``), over this checkout's files. That user can read neither root's home (where a
pyenv interpreter may live) nor tox's environments (mode 0700), so it runs the system's Python with
a readable copy of the pure-Python packages the plugin and the CLI load."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pytest_svctunnel.names import new_run_id

pytestmark = pytest.mark.root

ROOT = Path(__file__).parent.parent
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
PACKAGES = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "py", "pyroute2")
SUITE = """
def test_uses_the_tunnel(svctunnel):
    pass
"""


@dataclass
class Place:
    """A directory tree the unprivileged user can read, with its own runtime directory."""

    base: Path
    runtime: Path
    suite: Path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SVCTUNNEL_", "XDG_", "PYTEST_", "PYTHON"))}
        env |= {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "TMPDIR": str(self.base / "tmp")}
        env |= {"HOME": str(self.base), "PYTHONPATH": f"{ROOT}{os.pathsep}{self.base / 'lib'}"}
        env |= {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # the plugin comes by -p, found or not by its entry point
        return env | extra

    def run(self, argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all"]
        return subprocess.run(
            [*drop, *argv], capture_output=True, text=True, cwd=self.suite, env=env, timeout=120, check=False
        )

    def pytest(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        argv = [SYSTEM_PYTHON, "-m", "pytest", "-p", "pytest_svctunnel.plugin", "-p", "no:cacheprovider", "-q"]
        return self.run([*argv, "--svctunnel-backend", "lab", *args, "test_suite.py"], env)

    def cli(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
        return self.run([SYSTEM_PYTHON, "-m", "pytest_svctunnel", *args], env)


def readable_packages(dest: Path) -> None:
    """Copies of the packages the plugin and the CLI load, where any user can read them."""
    dest.mkdir(mode=0o755)
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, f"{name} is not installed"
        origin = Path(spec.origin)
        if origin.name == "__init__.py":
            shutil.copytree(origin.parent, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, dest / origin.name)
    for path in [dest, *dest.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.fixture
def place() -> Iterator[Place]:
    base = Path(tempfile.mkdtemp(prefix="svt-unpriv-"))
    try:
        base.chmod(0o755)
        runtime, suite, tmp = base / "runtime", base / "suite", base / "tmp"
        for path in (runtime, suite, tmp):
            path.mkdir(mode=0o755)
        os.chown(runtime, NOBODY, NOBODY)
        os.chown(tmp, NOBODY, NOBODY)
        runtime.chmod(0o700)
        (suite / "test_suite.py").write_text(SUITE)
        assert Path(SYSTEM_PYTHON).exists(), f"{SYSTEM_PYTHON} is missing: .ci/install installs python3"
        readable_packages(base / "lib")
        yield Place(base, runtime, suite)
    finally:
        shutil.rmtree(base)


@pytest.fixture
def roots_run(place: Place) -> Path:
    """A state root of root's (mode 0700) that holds one run of root's, as after a root session."""
    root = place.base / "root-state"
    root.mkdir(mode=0o700)
    (root / new_run_id()).mkdir(mode=0o700)
    return root


def one_line(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    """The single line the command printed on stderr, checked for every ``expected`` part."""
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and all(part in lines[0] for part in expected), done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    return lines[0]


def no_traceback(done: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in done.stdout + done.stderr, done.stdout + done.stderr
    assert "INTERNALERROR" not in done.stdout + done.stderr, done.stdout + done.stderr


def fixture_error(done: subprocess.CompletedProcess[str], *expected: str) -> None:
    """The session's one error: the test errors in setup with the plugin's line, nothing else."""
    no_traceback(done)
    assert done.returncode == pytest.ExitCode.TESTS_FAILED, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    heads = [i for i, line in enumerate(lines) if "ERROR at setup of test_uses_the_tunnel" in line]
    assert len(heads) == 1, done.stdout
    body = lines[heads[0] + 1 : heads[0] + 3]  # the report's one line, then the next section's rule
    assert all(part in body[0] for part in expected) and body[1].startswith(("---", "===")), done.stdout


def test_the_plugin_says_what_is_missing_and_leaves_the_users_state_root_clean(place: Place) -> None:
    done = place.pytest(place.env(XDG_RUNTIME_DIR=str(place.runtime)))
    fixture_error(done, "svctunnel: the svctunnel fixture needs CAP_NET_ADMIN", "run as root")
    own = place.runtime / "svctunnel"
    assert not own.exists() or list(own.iterdir()) == [], "a run that built nothing stayed on record"


def test_with_roots_state_root_the_plugin_and_its_reap_say_so_in_one_line(place: Place, roots_run: Path) -> None:
    done = place.pytest(place.env(SVCTUNNEL_STATE_DIR=str(roots_run)), "--svctunnel-reap", "true")
    fixture_error(done, "CAP_NET_ADMIN")
    skipped = [line for line in done.stdout.splitlines() if "reaping skipped" in line]
    assert len(skipped) == 1 and "CAP_NET_ADMIN" in skipped[0], done.stdout


def test_reap_with_roots_state_root_names_it_and_the_remedy(place: Place, roots_run: Path) -> None:
    env = place.env(SVCTUNNEL_STATE_DIR=str(roots_run))
    done = place.cli(env, "reap", "--dry-run")
    assert done.returncode == 1
    line = one_line(done, f"the state directory {roots_run} belongs to uid 0 with mode 0700", "SVCTUNNEL_STATE_DIR")
    assert f"uid {NOBODY}" in line
    done = place.cli(env, "reap")  # reaping needs the capability first
    assert done.returncode == 1
    one_line(done, "svctunnel reap needs CAP_NET_ADMIN", "run as root")


def test_reap_of_the_users_own_state_root_finds_nothing(place: Place) -> None:
    done = place.cli(place.env(XDG_RUNTIME_DIR=str(place.runtime)), "reap", "--dry-run")
    no_traceback(done)
    assert done.returncode == 0 and done.stdout.strip() == f"nothing to reap under {place.runtime}/svctunnel"


def test_a_per_user_state_root_another_user_made_is_refused(place: Place) -> None:
    """Without XDG_RUNTIME_DIR the default is TMPDIR/svctunnel-UID; one made by root (as a stranger
    could, in a shared /tmp) is never used."""
    planted = place.base / "tmp" / f"svctunnel-{NOBODY}"
    planted.mkdir()
    planted.chmod(0o777)
    done = place.cli(place.env(), "reap", "--dry-run")
    assert done.returncode == 1, done.stdout + done.stderr
    one_line(done, f"the state directory {planted} belongs to uid 0, not to this user", "have it removed")
    done = place.pytest(place.env(), "--svctunnel-reap", "true")
    fixture_error(done, "CAP_NET_ADMIN")
    skipped = [line for line in done.stdout.splitlines() if "reaping skipped" in line]
    assert len(skipped) == 1 and "--svctunnel-reap needs CAP_NET_ADMIN" in skipped[0], done.stdout
    assert list(planted.iterdir()) == []


@pytest.mark.parametrize("command", ["up", "down", "status"])
def test_lab_commands_say_what_is_missing(place: Place, roots_run: Path, command: str) -> None:
    for env in (place.env(XDG_RUNTIME_DIR=str(place.runtime)), place.env(SVCTUNNEL_STATE_DIR=str(roots_run))):
        done = place.cli(env, "lab", command)
        assert done.returncode == 1, done.stdout + done.stderr
        one_line(done, "svctunnel lab needs CAP_NET_ADMIN", "run as root")
