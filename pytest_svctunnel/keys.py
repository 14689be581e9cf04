"""Session keys: bytes in memory; hex text in key files and Secrets."""

from __future__ import annotations

import binascii
import secrets
from pathlib import Path

from .errors import ConfigError

KEY_BYTES = 32
MIN_KEY_BYTES = 16


def new_key() -> bytes:
    """A new random session key."""
    return secrets.token_bytes(KEY_BYTES)


def key_text(key: bytes) -> str:
    """A key as the hex text that key files, ``svctunnel keygen`` and Secrets hold."""
    return key.hex()


def parse_key(text: str, source: str) -> bytes:
    """Decode a hex key; ``source`` names where it came from, for the error."""
    stripped = text.strip()
    try:
        key = binascii.unhexlify(stripped)
    except (binascii.Error, ValueError):
        raise ConfigError(f"key in {source} is not hex text; create one with 'svctunnel keygen > FILE'") from None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(
            f"key in {source} is too short ({len(key)} bytes, need at least {MIN_KEY_BYTES});"
            " create one with 'svctunnel keygen > FILE'"
        )
    return key


def read_key_file(path: str | Path) -> bytes:
    """Read and check a key file written by ``svctunnel keygen``."""
    file = Path(path)
    try:
        text = file.read_text(encoding="ascii", errors="strict")
    except FileNotFoundError:
        raise ConfigError(f"key file {file} does not exist; create it with 'svctunnel keygen > {file}'") from None
    except (PermissionError, IsADirectoryError, UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"key file {file} cannot be read ({exc}); check its path and mode") from None
    return parse_key(text, f"key file {file}")


def write_key_file(path: Path, key: bytes) -> None:
    """Write a key file readable by its owner only."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(key_text(key) + "\n", encoding="ascii")
