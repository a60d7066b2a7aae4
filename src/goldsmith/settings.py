"""Where Goldsmith keeps its files on this host; each location can be moved with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path


def _dir(variable: str, default: str) -> Path:
    # An empty variable counts as unset, so `GOLDSMITH_HOME= cmd` doesn't mean "the current directory".
    return Path(os.environ.get(variable) or default).expanduser()


def goldsmith_home() -> Path:
    """Durable state: the local gallery, run outputs. `$GOLDSMITH_HOME`, default ~/.local/share/goldsmith."""
    return _dir("GOLDSMITH_HOME", "~/.local/share/goldsmith")


def goldsmith_cache() -> Path:
    """Re-creatable downloads (base images, scripts). `$GOLDSMITH_CACHE`, default ~/.cache/goldsmith."""
    return _dir("GOLDSMITH_CACHE", "~/.cache/goldsmith")


# The checkout (or installed package) root: dags/, plugins/ and include/ sit here.
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def templates_dir() -> Path:
    """The image templates, one DAG each: `$GOLDSMITH_TEMPLATES`, then `[goldsmith] templates_folder` in
    airflow.cfg (or `AIRFLOW__GOLDSMITH__TEMPLATES_FOLDER`), then include/templates of this checkout (an
    installed package has none: configure it)."""
    if os.environ.get("GOLDSMITH_TEMPLATES"):
        return _dir("GOLDSMITH_TEMPLATES", "")
    from airflow.configuration import conf  # here, not at the top: backends import this module, not Airflow

    return Path(conf.get("goldsmith", "templates_folder", fallback="") or PROJECT_ROOT / "include" / "templates")
