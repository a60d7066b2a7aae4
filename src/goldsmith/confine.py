"""The host files a template may reach: its file:// sources (scriptUri, File sourceUri) and a local VHD target.

The worker runs builds with its own rights (root, for the local backend), so without a bound a template could
bake `/etc/shadow`, `/proc/self/environ` (the Fernet key, the database URL) or another build's SSH key into its
image, or write a VHD anywhere. Allowed roots, after resolving symlinks:

- the folder that holds the templates folder (`$GOLDSMITH_TEMPLATES/..`, default `include/`), so
  `include/scripts` beside `include/templates` works;
- `$GOLDSMITH_HOME`, except its `staging` folder (build keys, other builds' disks);
- every folder in `$GOLDSMITH_ALLOWED_PATHS` (os.pathsep-separated), set by the operator.

Reads are regular files only (no device, FIFO or socket) of at most `$GOLDSMITH_MAX_SOURCE_BYTES` (default
2 GiB).
"""

from __future__ import annotations

import os
from pathlib import Path

from goldsmith.settings import goldsmith_home, templates_dir
from goldsmith.template.loader import UnreadableFile, read_regular_file

DEFAULT_MAX_SOURCE_BYTES = 2 * 1024**3


class ConfinementError(Exception):
    """A path outside the allowed roots, or a file that is not a plain, bounded file: the message says which."""


def allowed_roots() -> list[Path]:
    roots = [templates_dir().parent, goldsmith_home()]
    roots += [Path(p) for p in os.environ.get("GOLDSMITH_ALLOWED_PATHS", "").split(os.pathsep) if p.strip()]
    return [Path(os.path.realpath(r)) for r in roots]


def check(path: str | Path, what: str) -> Path:
    """`path` resolved, if it lies under an allowed root (and not in the staging area); else ConfinementError."""
    resolved = Path(os.path.realpath(path))
    staging = Path(os.path.realpath(goldsmith_home() / "staging"))
    roots = allowed_roots()
    if resolved.is_relative_to(staging) or not any(resolved.is_relative_to(r) for r in roots):
        raise ConfinementError(
            f"{what} {path} is outside the folders templates may use ({', '.join(map(str, roots))}): put it "
            "beside the templates folder (e.g. include/scripts), or have the operator add its folder to "
            "GOLDSMITH_ALLOWED_PATHS")
    return resolved


def read(path: str | Path, what: str) -> bytes:
    """The bytes of an allowed, regular file within the size limit."""
    resolved = check(path, what)
    limit = int(os.environ.get("GOLDSMITH_MAX_SOURCE_BYTES") or DEFAULT_MAX_SOURCE_BYTES)
    try:
        return read_regular_file(resolved, limit)
    except UnreadableFile as e:
        raise ConfinementError(f"{what} {path}: {e}") from None
