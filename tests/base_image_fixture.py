"""``base_image``: the Debian 12 base disk from the platform catalog's recipe, for tests that boot VMs.

Built once (about 2.5 minutes, as root or as any user with subordinate ids: no sudo) and then cached in
$GOLDSMITH_CACHE, so later sessions reuse it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from goldsmith.local import baseimage, catalog


@pytest.fixture(scope="session")
def base_image() -> Path:
    return baseimage.ensure_base_image(catalog.resolve("Debian", "debian-12", "12", "latest"))
