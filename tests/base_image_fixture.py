"""``base_image``: the Debian 12 base disk from the platform catalog's recipe, for tests that boot VMs.

Built once (about 2 minutes, needs root) and then cached in $GOLDSMITH_CACHE, so later sessions reuse it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from goldsmith.local import baseimage, catalog


@pytest.fixture(scope="session")
def base_image() -> Path:
    entry = catalog.resolve("Debian", "debian-12", "12", "latest")
    try:
        return baseimage.ensure_base_image(entry)
    except baseimage.BaseImageError:
        if os.geteuid() != 0:
            pytest.skip("no cached Debian base image, and building one needs root")
        raise
