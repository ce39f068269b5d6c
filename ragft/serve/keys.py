"""API keys: who may call the API (`RAGFT_API_KEYS`) and who may change the index (`RAGFT_ADMIN_KEY`).

Keys are read once by the `ragft serve` driver and travel to the replicas only as sha256
digests, so no key ever sits in a Ray actor's arguments, a log line or the saved config.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

API_KEYS_ENV = "RAGFT_API_KEYS"  # comma-separated
ADMIN_KEY_ENV = "RAGFT_ADMIN_KEY"  # comma-separated too, so keys can be rotated without downtime


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class KeyRing:
    api: frozenset[str] = frozenset()  # digests of keys that may call /v1
    admin: frozenset[str] = frozenset()  # digests of keys that may also update the index

    @property
    def configured(self) -> bool:
        return bool(self.api or self.admin)

    def role(self, authorization: Optional[str]) -> Optional[str]:
        """"admin", "user", or None for a missing or unknown bearer token."""
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        presented = digest(authorization[7:].strip())
        # compare_digest against every stored digest: the time taken says nothing about which one matched.
        is_admin = any([hmac.compare_digest(presented, d) for d in self.admin])
        is_user = any([hmac.compare_digest(presented, d) for d in self.api])
        return "admin" if is_admin else "user" if is_user else None


def load_keys(env: Mapping[str, str] = os.environ, keys_file: Optional[str] = None) -> tuple[KeyRing, list[str]]:
    """The key ring from the environment and `serve.api_keys_file`, and the problems found reading them."""
    problems: list[str] = []
    api = _split(env.get(API_KEYS_ENV, ""))
    admin = _split(env.get(ADMIN_KEY_ENV, ""))
    if keys_file:
        path = Path(keys_file).expanduser()
        try:
            warn_if_readable_by_others(path)
            data = json.loads(path.read_text())
            if not isinstance(data, dict):
                raise ValueError("expected a JSON object")
            for field, into in (("api_keys", api), ("admin_keys", admin)):
                values = data.get(field, [])
                if not isinstance(values, list) or not all(isinstance(v, str) and v.strip() for v in values):
                    raise ValueError(f"{field!r} must be a list of non-empty strings")
                into.extend(v.strip() for v in values)
            unknown = sorted(set(data) - {"api_keys", "admin_keys"})
            if unknown:
                raise ValueError(f"unknown fields {unknown} (expected api_keys, admin_keys)")
        except (OSError, ValueError) as err:
            problems.append(f"serve.api_keys_file={keys_file}: {err}")
    short = [k for k in api + admin if len(k) < 16]
    if short:
        problems.append(f"{len(short)} API key(s) are shorter than 16 characters: too easy to guess")
    return KeyRing(frozenset(map(digest, api)), frozenset(map(digest, admin))), problems


def warn_if_readable_by_others(path: Path) -> None:
    """Print a warning when users other than the owner may read the keys file (chmod 600 fixes it)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        print(f"ragft serve: warning: serve.api_keys_file={path} has mode {mode:o}: other users of this machine "
              f"may read the keys; chmod 600 {path}", file=sys.stderr, flush=True)


def _split(value: str) -> list[str]:
    return [k.strip() for k in value.split(",") if k.strip()]
