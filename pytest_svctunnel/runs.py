"""Run identity: every namespace, link and object a run creates carries its id.

A run's state directory holds its key, agent log and lab description, so that
``svctunnel lab down`` (or a reaper) can find exactly what the run made.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STATE_ENV = "SVCTUNNEL_STATE_DIR"
_DEFAULT_ROOT = "/run/svctunnel"
_JOURNAL = "runs.journal"


def state_root() -> Path:
    return Path(os.environ.get(STATE_ENV) or _DEFAULT_ROOT)


@dataclass(frozen=True)
class Run:
    """One run: a 6-hex-digit id and its private state directory."""

    id: str
    dir: Path

    @classmethod
    def new(cls) -> Run:
        while True:
            try:
                return cls.create(new_run_id())
            except FileExistsError:
                continue

    @classmethod
    def create(cls, run_id: str) -> Run:
        """Make the state directory of ``run_id``; FileExistsError if it is taken."""
        root = state_root()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        path = root / run_id
        path.mkdir(mode=0o700)
        with (root / _JOURNAL).open("a", encoding="ascii") as journal:
            journal.write(run_id + "\n")
        run = cls(run_id, path)
        run.write("owner.json", {"pid": os.getpid()})
        return run

    @property
    def link_prefix(self) -> str:
        """Every link this run creates in a shared namespace starts with this."""
        return f"svt{self.id}-"

    @classmethod
    def existing(cls, run_id: str) -> Run:
        return cls(run_id, state_root() / run_id)

    def write(self, name: str, data: dict[str, Any]) -> None:
        (self.dir / name).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")

    def read(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.dir / name).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) else None

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def new_run_id() -> str:
    return secrets.token_hex(3)


def journaled_ids() -> list[str]:
    """Every run id ever created under this state root, removed runs included."""
    try:
        return (state_root() / _JOURNAL).read_text(encoding="ascii").split()
    except FileNotFoundError:
        return []


def all_runs() -> list[Run]:
    root = state_root()
    if not root.is_dir():
        return []
    return [Run(p.name, p) for p in sorted(root.iterdir()) if p.is_dir()]
