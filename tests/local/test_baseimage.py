"""Base image cache with URL sources (file:// URLs stand in for the cloud image hosts)."""

from __future__ import annotations

import hashlib
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from goldsmith.local import baseimage
from goldsmith.local.baseimage import BaseImageError, ensure_base_image
from goldsmith.local.catalog import CatalogEntry, resolve


def url_entry(image: Path, sha256: str | None = None) -> CatalogEntry:
    sha = sha256 or hashlib.sha256(image.read_bytes()).hexdigest()
    return CatalogEntry(publisher="P", offer="O", sku="s", exact_version="1.0.0", kind="url",
                        url=image.as_uri(), sha256=sha)


@pytest.fixture
def image(tmp_path) -> Path:
    path = tmp_path / "cloud.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
    return path


def test_downloads_once_verified_then_serves_the_cache(tmp_path, image):
    cache = tmp_path / "cache"
    entry = url_entry(image)
    disk = ensure_base_image(entry, cache)
    assert disk == cache / "base" / entry.digest / "disk.qcow2"
    assert disk.read_bytes() == image.read_bytes()
    assert '"urn": "P:O:s:1.0.0"' in (disk.parent / "entry.json").read_text()
    image.unlink()  # a second call must not download again
    assert ensure_base_image(entry, cache) == disk


def test_concurrent_callers_share_one_download(tmp_path, image, monkeypatch):
    calls = []
    real = baseimage._download
    monkeypatch.setattr(baseimage, "_download", lambda entry, work: (calls.append(1), real(entry, work)))
    entry = url_entry(image)
    with ThreadPoolExecutor(4) as pool:
        disks = set(pool.map(lambda _: ensure_base_image(entry, tmp_path / "cache"), range(4)))
    assert len(disks) == 1 and len(calls) == 1


def test_checksum_mismatch_fails_and_leaves_nothing(tmp_path, image):
    entry = url_entry(image, sha256="0" * 64)
    with pytest.raises(BaseImageError, match="has sha256 .* the platform catalog says 0000"):
        ensure_base_image(entry, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache" / "base").iterdir()] == [f"{entry.digest}.lock"]


def test_unreachable_url_is_a_clear_error(tmp_path):
    entry = CatalogEntry(
        publisher="P", offer="O", sku="s", exact_version="1", kind="url",
        url=(tmp_path / "missing.qcow2").as_uri(), sha256="1" * 64)
    with pytest.raises(BaseImageError, match="cannot download P:O:s:1 from file://"):
        ensure_base_image(entry, tmp_path / "cache")


def test_an_image_with_a_backing_file_is_refused(tmp_path, image):
    overlay = tmp_path / "overlay.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(overlay)],
                   check=True)
    with pytest.raises(BaseImageError, match="not a standalone qcow2"):
        ensure_base_image(url_entry(overlay), tmp_path / "cache")


def test_recipe_build_without_subordinate_ids_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(baseimage.os, "geteuid", lambda: 54321)  # no passwd entry, no /etc/subuid line
    entry = resolve("Debian", "debian-12", "12", "latest")
    entry = replace(entry, recipe=replace(entry.recipe, revision=10**6))  # a digest that is surely not cached
    with pytest.raises(BaseImageError, match="no subordinate uid/gid range.*usermod --add-subuids"):
        ensure_base_image(entry, tmp_path / "cache")
    assert not any((tmp_path / "cache" / "base").glob(".tmp-*"))
