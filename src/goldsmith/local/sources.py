"""The local backend's source resolver: a template's source image, resolved to an exact version on this host
(platform images by the catalog, managed images and gallery versions by the local gallery).

Used by `plan` (through the backend), by the source AssetWatcher and by `goldsmith outdated` (through the
registry), so all three agree on what `latest` means.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from goldsmith.core import BuildError
from goldsmith.local import catalog
from goldsmith.local.gallery import GalleryError, LocalGallery
from goldsmith.provenance import Provenance


class LocalSources:
    def __init__(self, home: Path):
        self.gallery = LocalGallery(home / "gallery")

    def resolve(self, source: Any) -> dict[str, Any]:
        """`source` (the template's, a model or its JSON) as {type, id, exactVersion, parents[, path]}."""
        spec: dict[str, Any] = source if isinstance(source, dict) else source.model_dump(mode="json", exclude_none=True)

        def get(name: str) -> Any:
            return spec.get(name)

        try:
            if get("type") == "PlatformImage":
                entry = catalog.resolve(get("publisher"), get("offer"), get("sku"), get("version") or "latest")
                return {"type": "PlatformImage", "id": entry.urn, "exactVersion": entry.exact_version, "parents": []}
            if get("type") == "ManagedImage":
                image = self.gallery.resolve_managed_image(get("imageId"))
                # A managed image is replaced in place: its content checksum tells one build of it from another.
                return {"type": "ManagedImage", "id": image.id,
                        "exactVersion": "sha256:" + image.metadata["checksums"]["sha256"],
                        "path": str(image.path), "parents": [image.id]}
            version = self.gallery.resolve_image_version(get("imageVersionId"))
            return {"type": "SharedImageVersion", "id": version.id, "exactVersion": version.version,
                    "path": str(version.path), "parents": [version.id]}
        except (catalog.CatalogError, GalleryError) as e:
            raise BuildError(f"source: {e}") from None

    def latest(self, source: dict[str, Any]) -> tuple[str | None, Provenance | None]:
        """The exact version the source resolves to now, and its provenance when Goldsmith published it."""
        resolved = self.resolve(source)
        if resolved["type"] == "PlatformImage":
            return resolved["exactVersion"], None
        record = (self.gallery.resolve_managed_image(resolved["id"]) if resolved["type"] == "ManagedImage"
                  else self.gallery.resolve_image_version(resolved["id"]))
        provenance = record.metadata.get("provenance")
        return resolved["exactVersion"], Provenance.from_record(provenance) if provenance else None


def resolver(*, home: Path, conn_id: str | None = None, location: str | None = None) -> LocalSources:
    return LocalSources(home)
