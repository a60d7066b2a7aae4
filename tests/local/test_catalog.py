"""The platform catalog: AIB PlatformImage source -> base disk recipe or URL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from goldsmith.local.catalog import DEFAULT_CATALOG, CatalogError, load_catalog, resolve


def test_debian_latest_resolves_to_the_offline_recipe_case_insensitively():
    entry = resolve("debian", "Debian-12", "12", "LATEST")
    assert entry.kind == "recipe" and entry.url is None
    assert (entry.publisher, entry.offer, entry.sku) == ("Debian", "debian-12", "12")
    assert entry.exact_version == entry.recipe.version
    assert entry.digest == entry.recipe.digest and len(entry.digest) == 64
    assert entry.urn == f"Debian:debian-12:12:{entry.exact_version}"


def test_recipe_version_is_three_int32_parts_and_resolves_exactly():
    entry = resolve("Debian", "debian-12", "12-gen2", "latest")
    parts = [int(p) for p in entry.exact_version.split(".")]
    assert len(parts) == 3 and parts[0] == 0 and all(0 <= p < 2**31 for p in parts)
    assert resolve("Debian", "debian-12", "12-gen2", entry.exact_version) == entry
    # Both skus stand for the same recipe, hence the same disk.
    assert resolve("Debian", "debian-12", "12", "latest").digest == entry.digest


def test_url_entries_carry_url_and_sha256():
    jammy = resolve("Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts-gen2", "latest")
    assert jammy.kind == "url" and jammy.url.startswith("https://") and jammy.exact_version.startswith("22.04.")
    assert jammy.digest == jammy.sha256 and len(jammy.sha256) == 64
    assert resolve("Canonical", "ubuntu-24_04-lts", "server", "latest").exact_version.startswith("24.04.")
    assert resolve("Debian", "debian-12", "12-genericcloud", "latest").url.endswith(".qcow2")


def test_unknown_image_names_it_and_lists_the_catalog():
    with pytest.raises(CatalogError) as err:
        resolve("Debian", "debian-12", "13", "latest")
    message = str(err.value)
    assert "sku='13'" in message and "Debian/debian-12/12-gen2" in message
    assert "Canonical/0001-com-ubuntu-server-jammy/22_04-lts" in message


def test_unknown_version_lists_known_versions():
    with pytest.raises(CatalogError, match=r"no version '1\.2\.3'.*known versions: 22\.04\.\d+ \(or use 'latest'\)"):
        resolve("Canonical", "0001-com-ubuntu-server-jammy", "22_04-lts", "1.2.3")


def write_catalog(tmp_path: Path, images) -> Path:
    path = tmp_path / "catalog.json"
    path.write_text(json.dumps({"images": images}))
    return path


URL_IMAGE = {"publisher": "P", "offer": "O", "skus": ["s"], "versions": {
    "1.0.9": {"url": "file:///a", "sha256": "a" * 64},
    "1.0.10": {"url": "file:///b", "sha256": "B" * 64},
}}


def test_latest_compares_versions_as_integers(tmp_path):
    entry = resolve("p", "o", "S", "latest", catalog_path=write_catalog(tmp_path, [URL_IMAGE]))
    assert entry.exact_version == "1.0.10" and entry.url == "file:///b" and entry.sha256 == "b" * 64


def recipe(**changes):
    raw = json.loads(DEFAULT_CATALOG.read_text())["images"][0]["recipe"]
    return {**raw, **changes}


def test_recipe_digest_follows_the_recipe(tmp_path):
    def digest(**changes):
        image = {"publisher": "P", "offer": "O", "skus": ["s"], "recipe": recipe(**changes)}
        return resolve("P", "O", "s", "latest", catalog_path=write_catalog(tmp_path, [image])).digest

    assert digest() == digest()
    assert digest() == resolve("Debian", "debian-12", "12", "latest").digest
    assert digest(revision=2) != digest()
    assert digest(packages=[*recipe()["packages"], "curl"]) != digest()


@pytest.mark.parametrize(
    ("images", "message"),
    [
        ([{"offer": "O", "skus": ["s"], "versions": {}}], r"images\[0\]\.publisher: required"),
        ([{"publisher": "P", "offer": "O", "skus": [], "recipe": {}}], r"images\[0\]\.skus: required"),
        ([{"publisher": "P", "offer": "O", "skus": ["s"]}], "exactly one of 'recipe'"),
        ([{**URL_IMAGE, "versions": {"v1": {"url": "x", "sha256": "a" * 64}}}], "dotted integers"),
        ([{**URL_IMAGE, "versions": {"1": {"url": "x", "sha256": "abc"}}}], r"sha256: required, 64 hex digits"),
        ([{"publisher": "P", "offer": "O", "skus": ["s"], "recipe": recipe(suit="x")}], "unknown field.*suit"),
        ([{"publisher": "P", "offer": "O", "skus": ["s"], "recipe": recipe(revision="1")}], "revision: required, of type int"),
    ],
)
def test_malformed_catalog_gets_a_clear_error(tmp_path, images, message):
    with pytest.raises(CatalogError, match=message):
        load_catalog(write_catalog(tmp_path, images))


def test_missing_or_broken_catalog_file(tmp_path):
    with pytest.raises(CatalogError, match="does not exist"):
        resolve("P", "O", "s", "latest", catalog_path=tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(CatalogError, match="not valid JSON"):
        load_catalog(tmp_path / "bad.json")
