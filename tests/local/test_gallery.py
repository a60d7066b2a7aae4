"""The local gallery, on real files in tmp dirs."""

from __future__ import annotations

import hashlib
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from goldsmith.local.gallery import GalleryError, LocalGallery, parse_id
from goldsmith.settings import goldsmith_cache, goldsmith_home
from goldsmith.template.model import LatestVersioner, SourceVersioner, TargetRegion

RG = "/subscriptions/0000-1111/resourceGroups/imagesRG/providers/Microsoft.Compute"
DEFINITION = RG + "/galleries/corpGallery/images/ubuntu2204"
IMAGE = RG + "/images/golden"
PROVENANCE = {
    "source": {"type": "PlatformImage", "id": "Canonical:ubuntu:22_04-lts:latest", "exactVersion": "22.04.202401010"},
    "template": "ubuntu-golden",
    "templateDigest": "sha256:abc",
    "dagId": "ubuntu-golden",
    "runId": "manual__2025-01-01T00:00:00+00:00",
    "parents": [],
}


@pytest.fixture
def gallery(tmp_path: Path) -> LocalGallery:
    return LocalGallery(tmp_path / "gallery", region_storage={})


def make_disk(tmp_path: Path, content: bytes | None = None) -> Path:
    staging = tmp_path / "staging"
    staging.mkdir(exist_ok=True)
    disk = staging / f"{uuid.uuid4().hex}.qcow2"
    disk.write_bytes(b"QFI\xfb" + (content if content is not None else uuid.uuid4().bytes))
    return disk


def publish(gallery: LocalGallery, tmp_path: Path, gallery_image_id: str = DEFINITION, **kwargs):
    kwargs.setdefault("run_key", uuid.uuid4().hex)
    kwargs.setdefault("provenance", PROVENANCE)
    return gallery.publish_version(gallery_image_id, make_disk(tmp_path), **kwargs)


def versions(gallery: LocalGallery) -> list[str]:
    return [v["version"] for entry in gallery.list() for v in entry.get("versions", [])]


# --- versioning ---------------------------------------------------------------------------------------------

def test_latest_scheme_numbers_the_next_patch_above_the_highest(gallery, tmp_path):
    assert publish(gallery, tmp_path).version == "0.0.1"  # empty definition, no scheme: Latest
    publish(gallery, tmp_path, version="1.2.3")
    assert publish(gallery, tmp_path, versioning=LatestVersioner(scheme="Latest")).version == "1.2.4"
    assert publish(gallery, tmp_path).version == "1.2.5"


def test_latest_scheme_with_major_counts_only_that_major(gallery, tmp_path):
    for v in ("0.0.5", "1.1.2", "1.2.0", "2.0.1"):
        publish(gallery, tmp_path, version=v)
    assert publish(gallery, tmp_path, versioning=LatestVersioner(scheme="Latest", major=1)).version == "1.2.1"
    assert publish(gallery, tmp_path, versioning=LatestVersioner(scheme="Latest", major=0)).version == "0.0.6"
    assert publish(gallery, tmp_path, versioning=LatestVersioner(scheme="Latest", major=7)).version == "7.0.0"
    assert publish(gallery, tmp_path, versioning=LatestVersioner(scheme="Latest", major=-1)).version == "7.0.1"


def test_latest_scheme_compares_integers_not_strings(gallery, tmp_path):
    publish(gallery, tmp_path, version="1.10.0")
    publish(gallery, tmp_path, version="1.9.0")
    assert publish(gallery, tmp_path).version == "1.10.1"


def test_source_scheme_takes_the_source_version_as_integers(gallery, tmp_path):
    record = publish(gallery, tmp_path, versioning=SourceVersioner(scheme="Source"), source_version="22.04.202401010")
    assert record.version == "22.4.202401010"
    assert record.id == DEFINITION + "/versions/22.4.202401010"
    assert record.metadata["versionFrom"] == "versioning Source"


@pytest.mark.parametrize("source_version", [None, "", "1.2", "1.2.3.4", "1.2.x", "1.2.99999999999"])
def test_source_scheme_refuses_a_source_version_that_is_not_major_minor_patch(gallery, tmp_path, source_version):
    with pytest.raises(GalleryError, match="Source"):
        publish(gallery, tmp_path, versioning=SourceVersioner(scheme="Source"), source_version=source_version)
    assert versions(gallery) == []


def test_explicit_version_in_the_id_must_not_exist_yet(gallery, tmp_path):
    assert publish(gallery, tmp_path, DEFINITION + "/versions/2.0.0").version == "2.0.0"
    with pytest.raises(GalleryError, match=r"versions/2\.0\.0' already exists.*never overwrites"):
        publish(gallery, tmp_path, DEFINITION + "/versions/2.0.0")
    with pytest.raises(GalleryError, match="already exists"):
        publish(gallery, tmp_path, versioning=SourceVersioner(scheme="Source"), source_version="2.0.0")


def test_explicit_override_wins_over_the_id_and_the_scheme(gallery, tmp_path):
    record = publish(gallery, tmp_path, DEFINITION + "/versions/2.0.0", version="3.1.4",
                     versioning=LatestVersioner(scheme="Latest", major=9))
    assert record.version == "3.1.4"
    assert record.metadata["versionFrom"] == "explicit version"
    with pytest.raises(GalleryError, match="already exists"):
        publish(gallery, tmp_path, version="3.1.4")


@pytest.mark.parametrize("bad", ["1.0", "1.01.0", "v1.0.0", "1.0.0.0", "2147483648.0.0"])
def test_explicit_version_must_be_a_gallery_version(gallery, tmp_path, bad):
    with pytest.raises(GalleryError, match="major.minor.patch"):
        publish(gallery, tmp_path, version=bad)


def test_publishing_to_versions_latest_is_refused(gallery, tmp_path):
    with pytest.raises(GalleryError, match="can't publish to 'versions/latest'"):
        publish(gallery, tmp_path, DEFINITION + "/versions/latest")


# --- resolving ----------------------------------------------------------------------------------------------

def test_latest_resolves_to_the_highest_version_not_excluded(gallery, tmp_path):
    publish(gallery, tmp_path, version="1.9.0")
    publish(gallery, tmp_path, version="1.10.0")
    publish(gallery, tmp_path, version="1.11.0", exclude_from_latest=True)
    latest = gallery.resolve_image_version(DEFINITION + "/versions/latest")
    assert latest.version == "1.10.0"
    assert gallery.resolve_image_version(DEFINITION + "/versions/1.11.0").metadata["excludeFromLatest"] is True


def test_latest_with_every_version_excluded_names_them(gallery, tmp_path):
    publish(gallery, tmp_path, version="1.0.0", exclude_from_latest=True)
    with pytest.raises(GalleryError, match=r"excluded from latest \(1\.0\.0\)"):
        gallery.resolve_image_version(DEFINITION + "/versions/latest")


def test_ids_are_case_insensitive(gallery, tmp_path):
    publish(gallery, tmp_path, version="1.0.0")
    shouting = "/SUBSCRIPTIONS/0000-1111/resourcegroups/IMAGESRG/PROVIDERS/microsoft.compute/Galleries/CORPGALLERY"
    record = gallery.resolve_image_version(shouting + "/IMAGES/Ubuntu2204/Versions/LATEST")
    assert record.id == DEFINITION + "/versions/1.0.0"


def test_a_missing_version_lists_the_versions_there_are(gallery, tmp_path):
    publish(gallery, tmp_path, version="1.0.0")
    publish(gallery, tmp_path, version="1.1.0", exclude_from_latest=True)
    with pytest.raises(GalleryError) as e:
        gallery.resolve_image_version(DEFINITION + "/versions/2.0.0")
    assert "1.0.0" in str(e.value) and "1.1.0 (excluded from latest)" in str(e.value)


def test_a_missing_definition_lists_the_gallery_definitions(gallery, tmp_path):
    publish(gallery, tmp_path, version="1.0.0")
    with pytest.raises(GalleryError, match=r"definitions in gallery corpGallery:\n  .*/images/ubuntu2204$"):
        gallery.resolve_image_version(RG + "/galleries/corpGallery/images/debian12/versions/latest")


def test_a_missing_managed_image_lists_the_resource_groups_images(gallery, tmp_path):
    gallery.publish_managed_image(IMAGE, "eastus", make_disk(tmp_path), provenance=PROVENANCE, run_key="k")
    with pytest.raises(GalleryError, match=r"managed images in resource group imagesRG:\n  .*/images/golden$"):
        gallery.resolve_managed_image(RG + "/images/other")


@pytest.mark.parametrize("bad_id", [
    "",
    "golden",
    RG,
    RG + "/images",
    RG + "/images/golden/",
    RG.replace("Microsoft.Compute", "Microsoft.Storage") + "/images/golden",
    RG + "/galleries/g",
    RG + "/galleries/g/images/d/versions",
    RG + "/galleries/g/images/d/versions/1.0.0/extra/x",
    RG + "/disks/golden",
    "subscriptions/0000-1111/resourceGroups/imagesRG/providers/Microsoft.Compute/images/golden",
])
def test_bad_ids_say_what_shape_was_expected(bad_id):
    with pytest.raises(GalleryError, match=r"is not an image id; expected one of:\n  /subscriptions/\{subscription\}"):
        parse_id(bad_id)


@pytest.mark.parametrize("bad_id", [RG + "/images/..", RG + "/galleries/g/images/a b", RG + "/images/.hidden"])
def test_names_that_are_not_arm_names_are_refused(bad_id):
    with pytest.raises(GalleryError, match="is not a valid"):
        parse_id(bad_id)


def test_ids_of_the_wrong_kind_are_refused(gallery, tmp_path):
    with pytest.raises(GalleryError, match="is a managedImage id, but a SharedImage distribution needs"):
        publish(gallery, tmp_path, IMAGE)
    with pytest.raises(GalleryError, match="is a definition id, but a SharedImageVersion source needs"):
        gallery.resolve_image_version(DEFINITION)
    with pytest.raises(GalleryError, match="is a version id, but a ManagedImage source needs"):
        gallery.resolve_managed_image(DEFINITION + "/versions/1.0.0")


# --- idempotency, atomicity, disks --------------------------------------------------------------------------

def test_republishing_with_the_same_run_key_returns_the_first_version(gallery, tmp_path):
    first = publish(gallery, tmp_path, run_key="dag/run1/out")
    again = publish(gallery, tmp_path, run_key="dag/run1/out")
    assert again == first
    assert versions(gallery) == ["0.0.1"]


def test_concurrent_publishes_get_distinct_versions(gallery, tmp_path):
    with ThreadPoolExecutor(max_workers=6) as pool:
        records = list(pool.map(lambda _: publish(gallery, tmp_path), range(6)))
    assert sorted(r.version for r in records) == [f"0.0.{n}" for n in range(1, 7)]


def test_the_gallery_keeps_its_own_copy_of_the_disk(gallery, tmp_path):
    disk = make_disk(tmp_path, b"the image")
    record = gallery.publish_version(DEFINITION, disk, provenance=PROVENANCE, run_key="k")
    disk.unlink()  # the staging area goes away after the build
    assert record.path.read_bytes() == b"QFI\xfbthe image"
    assert record.path.parent.parent.parent.parent.parent.name == "corpgallery"
    assert record.metadata["checksums"]["sha256"] == hashlib.sha256(b"QFI\xfbthe image").hexdigest()
    on_disk = json.loads((record.path.parent / "metadata.json").read_text())
    assert on_disk == record.metadata
    assert on_disk["provenance"] == PROVENANCE and on_disk["runKey"] == "k"


def test_a_missing_disk_publishes_nothing(gallery, tmp_path):
    with pytest.raises(GalleryError, match="does not exist"):
        gallery.publish_version(DEFINITION, tmp_path / "nope.qcow2", provenance=PROVENANCE, run_key="k")
    assert gallery.list() == []


def test_a_disk_that_is_not_qcow2_is_refused(gallery, tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * 512)
    with pytest.raises(GalleryError, match="not a qcow2 image"):
        gallery.publish_version(DEFINITION, raw, provenance=PROVENANCE, run_key="k")


def test_provenance_must_be_complete(gallery, tmp_path):
    with pytest.raises(GalleryError, match="provenance lacks dagId, parents"):
        publish(gallery, tmp_path, provenance={k: v for k, v in PROVENANCE.items() if k not in ("dagId", "parents")})


def test_a_publish_failing_midway_leaves_nothing_visible(tmp_path):
    not_a_dir = tmp_path / "westeurope-storage"
    not_a_dir.write_text("a file where a directory should be")
    gallery = LocalGallery(tmp_path / "gallery", region_storage={"westeurope": not_a_dir})
    with pytest.raises(GalleryError, match="replica for region 'westeurope'.*GOLDSMITH_REGION_STORAGE"):
        publish(gallery, tmp_path, target_regions=[("westeurope", 1, "Standard_LRS")])
    assert gallery.list() == []
    versions_dir = gallery.root / "0000-1111/imagesrg/galleries/corpgallery/images/ubuntu2204/versions"
    assert list(versions_dir.iterdir()) == []  # not even a temp dir
    with pytest.raises(GalleryError, match="image definition"):
        gallery.resolve_image_version(DEFINITION + "/versions/latest")


def test_leftovers_of_a_crashed_publish_are_invisible_and_cleared(gallery, tmp_path):
    publish(gallery, tmp_path, version="1.0.0")
    versions_dir = gallery.root / "0000-1111/imagesrg/galleries/corpgallery/images/ubuntu2204/versions"
    leftover = versions_dir / ".tmp-crashed"
    leftover.mkdir()
    (leftover / "metadata.json").write_text(json.dumps({"id": DEFINITION + "/versions/9.0.0", "version": "9.0.0"}))
    assert gallery.resolve_image_version(DEFINITION + "/versions/latest").version == "1.0.0"
    assert versions(gallery) == ["1.0.0"]
    publish(gallery, tmp_path)
    assert not leftover.exists()


# --- regions ------------------------------------------------------------------------------------------------

def test_target_regions_map_to_region_storage(tmp_path, monkeypatch):
    eastus = tmp_path / "ssd-eastus"
    monkeypatch.setenv("GOLDSMITH_REGION_STORAGE", json.dumps({"East US": str(eastus)}))
    gallery = LocalGallery(tmp_path / "gallery")
    record = publish(gallery, tmp_path, version="1.0.0", target_regions=[
        ("eastus", 3, "Standard_ZRS"),
        TargetRegion(name="westeurope"),
    ])
    east, west = record.metadata["regions"]
    assert east == {
        "name": "eastus", "replicaCount": 3, "storageAccountType": "Standard_ZRS",
        "path": str(eastus / "0000-1111/imagesrg/galleries/corpgallery/images/ubuntu2204/versions/1.0.0/disk.qcow2"),
    }
    assert Path(east["path"]).read_bytes() == record.path.read_bytes()
    assert west == {"name": "westeurope", "replicaCount": 1, "storageAccountType": "Standard_LRS",
                    "path": str(record.path)}

    gallery.delete(record.id)
    assert not Path(east["path"]).exists() and gallery.list() == []


@pytest.mark.parametrize("value", ["not json", "[1]", '{"eastus": 3}', '{"eastus": "relative/dir"}'])
def test_bad_region_storage_setting_is_explained(tmp_path, monkeypatch, value):
    monkeypatch.setenv("GOLDSMITH_REGION_STORAGE", value)
    with pytest.raises(GalleryError, match="GOLDSMITH_REGION_STORAGE"):
        LocalGallery(tmp_path / "gallery")


# --- managed images -----------------------------------------------------------------------------------------

def test_managed_images_publish_once_per_run_and_are_never_overwritten(gallery, tmp_path):
    first = gallery.publish_managed_image(IMAGE, "eastus", make_disk(tmp_path), provenance=PROVENANCE, run_key="run1")
    assert gallery.publish_managed_image(IMAGE, "eastus", make_disk(tmp_path), provenance=PROVENANCE,
                                         run_key="run1") == first
    assert gallery.resolve_managed_image(IMAGE.replace("/images/golden", "/images/GOLDEN")) == first
    assert first.metadata["location"] == "eastus"

    with pytest.raises(GalleryError, match="already exists .* by run key 'run1'.*delete it first"):
        gallery.publish_managed_image(IMAGE, "eastus", make_disk(tmp_path), provenance=PROVENANCE, run_key="run2")
    gallery.delete(IMAGE)
    second = gallery.publish_managed_image(IMAGE, "eastus", make_disk(tmp_path), provenance=PROVENANCE, run_key="run2")
    assert second.metadata["runKey"] == "run2"


# --- listing ------------------------------------------------------------------------------------------------

def test_list_shows_definitions_with_versions_and_managed_images(gallery, tmp_path):
    publish(gallery, tmp_path, version="1.10.0", artifact_tags={"team": "infra"})
    publish(gallery, tmp_path, version="1.9.0")
    publish(gallery, tmp_path, version="2.0.0", exclude_from_latest=True)
    publish(gallery, tmp_path, RG + "/galleries/corpGallery/images/debian12", version="1.0.0")
    gallery.publish_managed_image(IMAGE, "eastus", make_disk(tmp_path), provenance=PROVENANCE, run_key="k")

    listing = gallery.list()
    json.dumps(listing)  # ready for `goldsmith gallery list --json`
    debian, ubuntu, image = listing
    assert debian["id"] == RG + "/galleries/corpGallery/images/debian12"
    assert ubuntu["type"] == "Microsoft.Compute/galleries/images"
    assert ubuntu["latestVersion"] == "1.10.0"
    assert [v["version"] for v in ubuntu["versions"]] == ["1.9.0", "1.10.0", "2.0.0"]
    assert ubuntu["versions"][1]["artifactTags"] == {"team": "infra"}
    assert ubuntu["versions"][1]["provenance"] == PROVENANCE
    assert Path(ubuntu["versions"][1]["path"]).is_file()
    assert image["id"] == IMAGE and image["type"] == "Microsoft.Compute/images"
    assert image["provenance"] == PROVENANCE


# --- settings -----------------------------------------------------------------------------------------------

def test_settings_follow_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GOLDSMITH_CACHE", str(tmp_path / "cache"))
    assert goldsmith_home() == tmp_path / "home"
    assert goldsmith_cache() == tmp_path / "cache"
    assert LocalGallery(region_storage={}).root == tmp_path / "home" / "gallery"
    monkeypatch.setenv("GOLDSMITH_HOME", "")
    monkeypatch.delenv("GOLDSMITH_CACHE")
    assert goldsmith_home() == Path("~/.local/share/goldsmith").expanduser()
    assert goldsmith_cache() == Path("~/.cache/goldsmith").expanduser()
