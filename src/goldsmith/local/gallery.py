"""The local gallery: where built images land on this host, addressed by the ARM ids AIB uses.

Two kinds of artifact, as in Azure:

    managed image   /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/images/{name}
    image version   /subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/galleries/{g}/images/{def}/versions/{x.y.z}

Layout under the root (`$GOLDSMITH_HOME/gallery`). ARM ids are case-insensitive, so directory names are
lower-cased; `metadata.json` keeps the id as it was published:

    {s}/{rg}/images/.lock                                   serializes publishes of this RG's managed images
    {s}/{rg}/images/{name}/disk.qcow2
    {s}/{rg}/images/{name}/metadata.json
    {s}/{rg}/galleries/{g}/images/{def}/.lock               serializes publishes of this definition's versions
    {s}/{rg}/galleries/{g}/images/{def}/versions/{x.y.z}/disk.qcow2
    {s}/{rg}/galleries/{g}/images/{def}/versions/{x.y.z}/metadata.json

Image definitions exist implicitly, from their first version (Azure wants them created first; locally they
carry nothing worth creating). `metadata.json` holds `id`, `type`, `createdTime`, `runKey` (what makes a
retried publish return the first result), `artifactTags`, `checksums` {`sha256` of disk.qcow2},
`provenance` {`source` {type, id, exactVersion}, `template`, `templateDigest`, `dagId`, `runId`, `parents`
(artifact ids it was built from), `sbom` (goldsmith.sbom.SbomRef, when the build made one)}; the SBOM itself is
`sbom.cdx.json` beside the disk; versions add `version`, `versionFrom`, `excludeFromLatest` and `regions`;
managed images add `location`.

Regions: `targetRegions` are recorded with their replicaCount and storageAccountType. A region mapped in
`$GOLDSMITH_REGION_STORAGE` (JSON: {"eastus": "/mnt/eastus"}) gets one replica at
`{that dir}/{the version's relative path}/disk.qcow2`; other regions are served by the disk in the gallery
root. One file per region, whatever the replicaCount: replicas only add read throughput in Azure.
Each region's `path` is in the metadata. Managed images live in the root only.

Writes are atomic: an artifact is assembled in a `.tmp-*` directory beside its final place and renamed into
place, so a crash never leaves a half artifact visible and `latest` never sees one. A publish holds the lock
named above for its whole length, so two runs can't pick the same version, and it clears `.tmp-*` leftovers
of crashed publishes. Disks come in as a hard link when possible, else a reflink, else a copy: the caller's
staging file may be deleted afterwards, but must not be modified in place (it may be the same inode).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from goldsmith import versions
from goldsmith.settings import goldsmith_home
from goldsmith.template.model import LatestVersioner, SourceVersioner, TargetRegion

DISK = "disk.qcow2"
METADATA = "metadata.json"
MANAGED_IMAGE_TYPE = "Microsoft.Compute/images"
DEFINITION_TYPE = "Microsoft.Compute/galleries/images"
VERSION_TYPE = "Microsoft.Compute/galleries/images/versions"
PROVENANCE_KEYS = ("source", "template", "templateDigest", "dagId", "runId", "parents")

_PREFIX = "/subscriptions/{subscription}/resourceGroups/{resourceGroup}/providers/Microsoft.Compute"
SHAPES = {
    "managedImage": _PREFIX + "/images/{name}",
    "definition": _PREFIX + "/galleries/{gallery}/images/{definition}",
    "version": _PREFIX + "/galleries/{gallery}/images/{definition}/versions/{x.y.z|latest}",
}
# Characters ARM allows in resource group, gallery and image names; also keeps each one a single safe path part.
_NAME = re.compile(r"[A-Za-z0-9_()-][A-Za-z0-9._()-]*")
_LABELS = {"subscriptions": "subscription", "resourcegroups": "resource group", "galleries": "gallery", "images": "image"}
_QCOW2_MAGIC = b"QFI\xfb"
_FICLONE = 0x40049409  # linux/fs.h: share the source's extents (btrfs, XFS) instead of copying bytes


class GalleryError(Exception):
    """A bad id, a missing artifact or a publish that can't go ahead; the message names the id and the fix."""


@dataclass(frozen=True)
class ImageRecord:
    id: str
    path: Path
    metadata: dict[str, Any]


@dataclass(frozen=True)
class VersionRecord:
    id: str
    version: str
    path: Path
    metadata: dict[str, Any]


@dataclass(frozen=True)
class ArmId:
    """A parsed managed image, image definition or image version id."""

    subscription: str
    resource_group: str
    image: str | None = None  # managed image name
    gallery: str | None = None
    definition: str | None = None
    version: str | None = None  # "x.y.z" or "latest"

    @property
    def kind(self) -> str:
        if self.image is not None:
            return "managedImage"
        return "definition" if self.version is None else "version"

    def __str__(self) -> str:
        prefix = f"/subscriptions/{self.subscription}/resourceGroups/{self.resource_group}/providers/Microsoft.Compute"
        if self.image is not None:
            return f"{prefix}/images/{self.image}"
        definition = f"{prefix}/galleries/{self.gallery}/images/{self.definition}"
        return definition if self.version is None else f"{definition}/versions/{self.version}"

    def parts(self) -> tuple[str, ...]:
        """The artifact's directory, relative to the gallery root."""
        base = (self.subscription.lower(), self.resource_group.lower())
        if self.image is not None:
            return (*base, "images", self.image.lower())
        definition = (*base, "galleries", self.gallery.lower(), "images", self.definition.lower())
        return definition if self.version is None else (*definition, "versions", self.version)


def parse_id(artifact_id: str) -> ArmId:
    """Parse a managed image, image definition or image version id; segment names match case-insensitively."""
    segments = artifact_id.split("/")
    pairs = list(zip(segments[1::2], segments[2::2]))
    keys = [key.lower() for key, _ in pairs]
    well_formed = (
        segments[0] == ""
        and len(segments) % 2 == 1
        and keys[:3] == ["subscriptions", "resourcegroups", "providers"]
        and pairs[2][1].lower() == "microsoft.compute"
        and keys[3:] in (["images"], ["galleries", "images"], ["galleries", "images", "versions"])
    )
    if not well_formed:
        shapes = "\n  ".join(SHAPES.values())
        raise GalleryError(f"'{artifact_id}' is not an image id; expected one of:\n  {shapes}")
    values = [value for _, value in pairs]
    for key, value in pairs[:2] + pairs[3:5]:
        if not _NAME.fullmatch(value):
            raise GalleryError(
                f"'{artifact_id}': '{value}' is not a valid {_LABELS[key.lower()]} name "
                "(letters, digits, '.', '_', '-', '(', ')'; not starting with '.')"
            )
    subscription, group = values[0], values[1]
    if keys[3:] == ["images"]:
        return ArmId(subscription, group, image=values[3])
    version = values[5] if len(values) > 5 else None
    if version is not None:
        try:
            version = "latest" if version.lower() == "latest" else versions.check(version, f"'{artifact_id}': version")
        except versions.VersionError as e:
            raise GalleryError(str(e)) from None
    return ArmId(subscription, group, gallery=values[3], definition=values[4], version=version)


def _expect(artifact_id: str, purpose: str, *kinds: str) -> ArmId:
    ref = parse_id(artifact_id)
    if ref.kind not in kinds:
        shapes = "\n  ".join(SHAPES[kind] for kind in kinds)
        raise GalleryError(f"'{artifact_id}' is a {ref.kind} id, but {purpose} needs:\n  {shapes}")
    return ref


def _region_storage_from_env() -> dict[str, Path]:
    raw = os.environ.get("GOLDSMITH_REGION_STORAGE")
    if not raw:
        return {}
    try:
        mapping = json.loads(raw)
    except json.JSONDecodeError:
        mapping = None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) and v for v in mapping.values()):
        raise GalleryError(
            f"GOLDSMITH_REGION_STORAGE must be a JSON object of region -> directory, "
            f'like {{"eastus": "/mnt/eastus"}}; got {raw!r}'
        )
    return mapping


def _target_region(region: TargetRegion | tuple[str, int, str]) -> dict[str, Any]:
    name, count, account = (
        (region.name, region.replicaCount, region.storageAccountType) if isinstance(region, TargetRegion) else region
    )
    if not name or count < 1:
        raise GalleryError(f"target region {region!r}: needs a name and a replicaCount of at least 1")
    return {"name": name, "replicaCount": count, "storageAccountType": account}


def _check_publish_inputs(disk: Path, provenance: Mapping[str, Any], run_key: str) -> None:
    if not disk.is_file():
        raise GalleryError(f"disk '{disk}' does not exist or is not a file; pass the captured qcow2 image")
    with open(disk, "rb") as f:
        if f.read(4) != _QCOW2_MAGIC:
            raise GalleryError(f"disk '{disk}' is not a qcow2 image; convert it: qemu-img convert -O qcow2 IN OUT")
    missing = [key for key in PROVENANCE_KEYS if key not in provenance]
    if missing:
        raise GalleryError(
            f"provenance lacks {', '.join(missing)}; it needs {', '.join(PROVENANCE_KEYS)} "
            "(source = {type, id, exactVersion}; parents = the artifact ids it was built from)"
        )
    try:
        json.dumps(provenance)
    except (TypeError, ValueError) as e:
        raise GalleryError(f"provenance must be plain JSON (str, numbers, lists, dicts): {e}") from None
    if not run_key:
        raise GalleryError("run_key is empty; pass something unique to this distribution, e.g. dag/run/runOutputName")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _place(source: Path, dest: Path) -> None:
    """Put `source`'s content at `dest` without keeping `source`'s path: hard link, else reflink, else copy."""
    try:
        os.link(source, dest)
        return
    except OSError:
        pass  # another filesystem, or links not allowed
    try:
        with open(source, "rb") as src, open(dest, "wb") as dst:
            fcntl.ioctl(dst.fileno(), _FICLONE, src.fileno())
        return
    except OSError:
        pass  # no reflinks here
    shutil.copyfile(source, dest)


def _fsync(path: Path) -> None:
    # Data on disk before the rename publishes it: after a power cut a visible artifact is a whole one.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _clear_leftovers(parent: Path) -> None:
    """Remove `.tmp-*` directories of crashed publishes; call only while holding the lock over `parent`."""
    for leftover in parent.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def _read_metadata(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / METADATA).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise GalleryError(f"{directory / METADATA} is unreadable ({e}); fix or delete that artifact directory") from None


def _visible(path: Path) -> bool:
    return not any(part.startswith(".") for part in path.parts)


class LocalGallery:
    """Managed images and gallery image versions on this host; see the module docstring for the layout."""

    def __init__(self, root: Path | None = None, region_storage: Mapping[str, str | Path] | None = None):
        self.root = Path(root) if root is not None else goldsmith_home() / "gallery"
        mapping = _region_storage_from_env() if region_storage is None else region_storage
        self.region_storage = {versions.region(name): Path(path).expanduser() for name, path in mapping.items()}
        for name, path in self.region_storage.items():
            if not path.is_absolute() or path.resolve() == self.root.resolve():
                raise GalleryError(
                    f"region storage for '{name}' is '{path}'; it must be an absolute directory other than the "
                    f"gallery root {self.root} (set it in GOLDSMITH_REGION_STORAGE)"
                )

    # --- publishing ---------------------------------------------------------------------------------------

    def publish_version(
        self,
        galleryImageId: str,
        disk: Path,
        *,
        versioning: LatestVersioner | SourceVersioner | None = None,
        version: str | None = None,
        source_version: str | None = None,
        exclude_from_latest: bool = False,
        target_regions: Iterable[TargetRegion | tuple[str, int, str]] = (),
        artifact_tags: Mapping[str, str] | None = None,
        provenance: Mapping[str, Any],
        run_key: str,
        files: Mapping[str, Path] | None = None,
    ) -> VersionRecord:
        """Publish `disk` as a new version of an image definition, numbered as AIB would.

        The number comes from, in order: `version` (an explicit override), a `.../versions/x.y.z` in
        `galleryImageId`, the `versioning` scheme (Source: `source_version`; Latest: next patch), else Latest.
        An explicit or Source-derived version must not exist yet (AIB never overwrites a version). If a version
        published with the same `run_key` exists, it is returned as is: a retried task publishes once.
        """
        ref = _expect(galleryImageId, "a SharedImage distribution", "definition", "version")
        if ref.version == "latest":
            raise GalleryError(
                f"'{galleryImageId}': can't publish to 'versions/latest'; name a new version (x.y.z) "
                "or give the image definition id to number versions automatically"
            )
        disk = Path(disk)
        _check_publish_inputs(disk, provenance, run_key)
        regions = [_target_region(region) for region in target_regions]
        definition = replace(ref, version=None)
        with _locked(self._dir(definition)):
            existing = self._versions(definition)
            for record in existing:
                if record.metadata.get("runKey") == run_key:
                    return record
            try:
                number, origin = versions.choose(
                    explicit=version, in_id=ref.version, versioning=versioning, source_version=source_version,
                    taken={record.version for record in existing}, named=lambda n: f"'{replace(definition, version=n)}'")
            except versions.VersionError as e:
                raise GalleryError(str(e)) from None
            target = replace(definition, version=number)
            metadata = {
                "id": str(target),
                "type": VERSION_TYPE,
                "version": number,
                "versionFrom": origin,
                "createdTime": _now(),
                "runKey": run_key,
                "excludeFromLatest": exclude_from_latest,
                "artifactTags": dict(artifact_tags or {}),
                "provenance": dict(provenance),
            }
            path, metadata = self._commit(target, disk, metadata, regions, files)
            return VersionRecord(metadata["id"], number, path, metadata)

    def publish_managed_image(
        self,
        imageId: str,
        location: str,
        disk: Path,
        *,
        artifact_tags: Mapping[str, str] | None = None,
        provenance: Mapping[str, Any],
        run_key: str,
        files: Mapping[str, Path] | None = None,
    ) -> ImageRecord:
        """Publish `disk` as a managed image; the same `run_key` again returns the first result.

        An existing image published by another run is an error, as in AIB: Azure refuses to change an existing
        image's source (only its tags), so distributing onto an existing managed image fails there too.
        """
        ref = _expect(imageId, "a ManagedImage distribution", "managedImage")
        disk = Path(disk)
        _check_publish_inputs(disk, provenance, run_key)
        with _locked(self._dir(ref).parent):
            existing = self._image(ref)
            if existing is not None:
                if existing.metadata.get("runKey") == run_key:
                    return existing
                raise GalleryError(
                    f"managed image '{imageId}' already exists (created {existing.metadata.get('createdTime')} by "
                    f"run key '{existing.metadata.get('runKey')}'); like AIB, Goldsmith doesn't overwrite managed "
                    "images: delete it first (LocalGallery.delete) or distribute to a new imageId"
                )
            metadata = {
                "id": str(ref),
                "type": MANAGED_IMAGE_TYPE,
                "location": location,
                "createdTime": _now(),
                "runKey": run_key,
                "artifactTags": dict(artifact_tags or {}),
                "provenance": dict(provenance),
            }
            path, metadata = self._commit(ref, disk, metadata, None, files)
            return ImageRecord(metadata["id"], path, metadata)

    def delete(self, artifact_id: str) -> None:
        """Delete a managed image or an image version, with its region replicas."""
        ref = _expect(artifact_id, "delete", "managedImage", "version")
        if ref.version == "latest":
            raise GalleryError(f"'{artifact_id}': delete needs an exact version, not 'latest'")
        final = self._dir(ref)
        lock_dir = final.parent if ref.kind == "managedImage" else final.parent.parent
        with _locked(lock_dir):
            metadata = _read_metadata(final)
            if metadata is None:
                raise GalleryError(f"'{artifact_id}' is not in the local gallery {self.root}; nothing to delete")
            trash = final.parent / f".tmp-{uuid.uuid4().hex}"
            os.rename(final, trash)  # gone from view at once; the bytes go next
            for region in metadata.get("regions", []):
                replica = Path(region["path"]).parent
                if replica != final:
                    shutil.rmtree(replica, ignore_errors=True)
            shutil.rmtree(trash)

    def _commit(
        self, ref: ArmId, disk: Path, metadata: dict[str, Any], regions: list[dict[str, Any]] | None,
        files: Mapping[str, Path] | None = None,
    ) -> tuple[Path, dict[str, Any]]:
        """Assemble the artifact in a temp dir (with `files` beside the disk, e.g. its SBOM), place region
        replicas, then rename it into view."""
        final = self._dir(ref)
        final.parent.mkdir(parents=True, exist_ok=True)
        _clear_leftovers(final.parent)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
        replicas: list[Path] = []  # outside the root: removed again if the publish fails
        try:
            _place(disk, staging / DISK)
            _fsync(staging / DISK)
            metadata["checksums"] = {"sha256": _sha256(staging / DISK)}
            for name, path in (files or {}).items():
                if name in (DISK, METADATA) or not _NAME.fullmatch(name):
                    raise GalleryError(f"'{name}' can't be stored beside an artifact: name it something else")
                shutil.copyfile(path, staging / name)
            if regions is not None:
                for region in regions:
                    replica = self._replicate(ref, staging / DISK, region["name"], replicas)
                    region["path"] = str(replica or final / DISK)  # unmapped regions are served from the root
                metadata["regions"] = regions
            (staging / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
            _fsync(staging / METADATA)
            os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            for replica in replicas:
                shutil.rmtree(replica, ignore_errors=True)
            raise
        return final / DISK, metadata

    def _replicate(self, ref: ArmId, disk: Path, region: str, replicas: list[Path]) -> Path | None:
        """Put a replica in the region's storage, if it has one; returns its path."""
        storage = self.region_storage.get(versions.region(region))
        if storage is None:
            return None
        replica = storage.joinpath(*ref.parts())
        # Anything already there is a crashed publish's orphan: the root has no such artifact (we hold the lock).
        shutil.rmtree(replica, ignore_errors=True)
        replicas.append(replica)
        try:
            replica.mkdir(parents=True)
            _place(disk, replica / DISK)
            _fsync(replica / DISK)
        except OSError as e:
            raise GalleryError(
                f"can't store the replica for region '{region}' under {storage}: {e}; "
                "fix that directory or its entry in GOLDSMITH_REGION_STORAGE"
            ) from None
        return replica / DISK

    # --- reading ------------------------------------------------------------------------------------------

    def resolve_managed_image(self, imageId: str) -> ImageRecord:
        ref = _expect(imageId, "a ManagedImage source", "managedImage")
        record = self._image(ref)
        if record is None:
            group = ref.parts()[:2]
            nearby = [image.id for image in self._managed_images() if parse_id(image.id).parts()[:2] == group]
            raise self._missing("managed image", imageId, f"managed images in resource group {ref.resource_group}", nearby)
        return record

    def resolve_image_version(self, imageVersionId: str) -> VersionRecord:
        """An exact version, or for `versions/latest` the highest one not excluded from latest."""
        ref = _expect(imageVersionId, "a SharedImageVersion source", "version")
        definition = replace(ref, version=None)
        versions = self._versions(definition)
        if not versions:
            gallery = definition.parts()[:4]
            nearby = [d for d in self._definitions() if parse_id(d).parts()[:4] == gallery]
            raise self._missing("image definition", str(definition), f"definitions in gallery {ref.gallery}", nearby)
        if ref.version == "latest":
            eligible = [v for v in versions if not v.metadata.get("excludeFromLatest")]
            if not eligible:
                raise GalleryError(
                    f"'{imageVersionId}': every version of {definition} is excluded from latest "
                    f"({', '.join(v.version for v in versions)}); name one as .../versions/x.y.z"
                )
            return eligible[-1]
        for record in versions:
            if record.version == ref.version:
                return record
        listing = [v.version + (" (excluded from latest)" if v.metadata.get("excludeFromLatest") else "") for v in versions]
        raise self._missing("image version", imageVersionId, f"versions of {definition}", listing)

    def list(self) -> list[dict[str, Any]]:
        """Every image definition (with its versions, oldest first) and every managed image, as JSON-ready dicts.

        Each version and managed image is its metadata (provenance included) plus `path`; a definition also
        names the version `latest` resolves to.
        """
        entries: list[dict[str, Any]] = []
        for definition, versions in sorted(self._definitions().items(), key=lambda item: item[0].lower()):
            eligible = [v.version for v in versions if not v.metadata.get("excludeFromLatest")]
            entries.append({
                "id": definition,
                "type": DEFINITION_TYPE,
                "latestVersion": eligible[-1] if eligible else None,
                "versions": [{**v.metadata, "path": str(v.path)} for v in versions],
            })
        for image in sorted(self._managed_images(), key=lambda image: image.id.lower()):
            entries.append({**image.metadata, "path": str(image.path)})
        return entries

    def _dir(self, ref: ArmId) -> Path:
        return self.root.joinpath(*ref.parts())

    def _image(self, ref: ArmId) -> ImageRecord | None:
        return self._image_at(self._dir(ref))

    @staticmethod
    def _image_at(directory: Path) -> ImageRecord | None:
        metadata = _read_metadata(directory)
        return None if metadata is None else ImageRecord(metadata["id"], directory / DISK, metadata)

    def _versions(self, definition: ArmId) -> list[VersionRecord]:
        """The definition's versions, lowest first (integer order: 1.9.0 < 1.10.0)."""
        records = []
        for directory in self._dir(definition).joinpath("versions").glob("[0-9]*"):
            metadata = _read_metadata(directory)
            if metadata is not None:
                records.append(VersionRecord(metadata["id"], metadata["version"], directory / DISK, metadata))
        return sorted(records, key=lambda record: versions.key(record.version))

    def _definitions(self) -> dict[str, list[VersionRecord]]:
        """Definition id -> its versions, for every definition that has a version."""
        # Keyed by directory: ids differing only in case are one definition.
        definitions: dict[tuple[str, ...], ArmId] = {}
        for found in self.root.glob(f"*/*/galleries/*/images/*/versions/*/{METADATA}"):
            if _visible(found.relative_to(self.root)):
                definition = replace(parse_id(_read_metadata(found.parent)["id"]), version=None)
                definitions.setdefault(definition.parts(), definition)
        return {str(definition): self._versions(definition) for definition in definitions.values()}

    def _managed_images(self) -> list[ImageRecord]:
        found = self.root.glob(f"*/*/images/*/{METADATA}")
        records = [self._image_at(path.parent) for path in found if _visible(path.relative_to(self.root))]
        return [record for record in records if record is not None]  # None: deleted while we looked

    def _missing(self, what: str, artifact_id: str, scope: str, nearby: list[str]) -> GalleryError:
        listing = "\n  ".join(nearby) if nearby else "(none)"
        return GalleryError(f"{what} '{artifact_id}' is not in the local gallery {self.root}; {scope}:\n  {listing}")
