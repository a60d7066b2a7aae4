"""Helpers for the template-layer tests: a valid minimal template to start from, and a file writer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest


def minimal_body() -> dict[str, Any]:
    """A valid resource body with just the required parts."""
    return {
        "location": "westeurope",
        "properties": {
            "source": {"type": "PlatformImage", "publisher": "Canonical", "offer": "ubuntu-24_04-lts",
                       "sku": "server", "version": "latest"},
            "distribute": [{"type": "VHD", "runOutputName": "vhd"}],
        },
    }


@pytest.fixture
def body() -> dict[str, Any]:
    return minimal_body()


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., Path]:
    """write(document) -> path of `t.json` holding it (a str is written as is)."""

    def write(document: Any, name: str = "t.json") -> Path:
        path = tmp_path / name
        path.write_text(document if isinstance(document, str) else json.dumps(document, indent=2))
        return path

    return write
