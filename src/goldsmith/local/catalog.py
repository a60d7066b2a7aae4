"""The platform catalog: which base disk an AIB ``PlatformImage`` source stands for on the local backend.

``include/platform-catalog.json`` lists images by publisher, offer and skus (matched case-insensitively,
as Azure does). Each image is one of two kinds:

- ``url``: published cloud images, one per exact version, each with the sha256 of the file. They are
  downloaded once into the cache and verified (for users who can reach the image's host).
- ``recipe``: a Debian base built offline from the Debian mirror by ``goldsmith.local.baseimage``.
  A recipe has exactly one version, derived from the recipe itself:
  ``0.<revision>.<first 7 hex digits of the recipe digest, as an integer>``, e.g. ``0.1.12345678``. It is
  stable (same recipe, same version), changes whenever the recipe does, and has three integer parts
  below 2**31 like Azure image versions. Bump ``revision`` when the build code changes the image.

``version`` ``latest`` resolves to the highest version listed (dotted parts compared as integers); any
other value must match a listed version exactly. The resolved version is ``CatalogEntry.exact_version``.

Skus ``12`` and ``12-gen2`` share one recipe: it boots with BIOS (GPT + BIOS boot partition, as QEMU's
SeaBIOS wants) and has no EFI system partition, so a VHD of it boots on Azure Generation 1 VMs only.
The URL entries' sha256 values are those published in the images' SHA256SUMS (as other public projects pin
them); this machine cannot reach those hosts, so they were not downloaded here.

``digest`` identifies the disk's content: the file's sha256 for ``url``, the sha256 of the canonical JSON
of the recipe for ``recipe``. The cache is keyed by it.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from goldsmith.versions import key as version_order

DEFAULT_CATALOG = Path(__file__).resolve().parents[3] / "include" / "platform-catalog.json"


class CatalogError(ValueError):
    """The catalog cannot answer: unknown image or version, or a malformed catalog file."""


@dataclass(frozen=True)
class Recipe:
    """How to bootstrap a Debian base with mmdebstrap (see goldsmith.local.baseimage)."""

    revision: int
    suite: str
    mirror: str
    security_mirror: str
    disk_size_gib: int
    packages: tuple[str, ...]
    path_exclude: tuple[str, ...]

    @property
    def digest(self) -> str:
        canonical = json.dumps(
            {
                "revision": self.revision,
                "suite": self.suite,
                "mirror": self.mirror,
                "security_mirror": self.security_mirror,
                "disk_size_gib": self.disk_size_gib,
                "packages": list(self.packages),
                "path_exclude": list(self.path_exclude),
            },
            sort_keys=True,
            separators=(",", ":"),
        )
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def version(self) -> str:
        return f"0.{self.revision}.{int(self.digest[:7], 16)}"


@dataclass(frozen=True)
class CatalogEntry:
    """One resolved source image: where its disk comes from and its exact version."""

    publisher: str
    offer: str
    sku: str
    exact_version: str
    kind: str  # "url" or "recipe"
    url: str | None = None
    sha256: str | None = None
    recipe: Recipe | None = None

    @property
    def digest(self) -> str:
        if self.recipe is not None:
            return self.recipe.digest
        assert self.sha256 is not None
        return self.sha256

    @property
    def urn(self) -> str:
        """``publisher:offer:sku:version``, as the Azure CLI spells an image."""
        return f"{self.publisher}:{self.offer}:{self.sku}:{self.exact_version}"


def resolve(
    publisher: str, offer: str, sku: str, version: str = "latest", *, catalog_path: Path | None = None
) -> CatalogEntry:
    """The catalog entry for an AIB PlatformImage source; ``version`` is ``latest`` or an exact version."""
    path = catalog_path or DEFAULT_CATALOG
    images = load_catalog(path)
    wanted = (publisher.lower(), offer.lower(), sku.lower())
    for image in images:
        if (image["publisher"].lower(), image["offer"].lower()) != wanted[:2]:
            continue
        skus = {s.lower(): s for s in image["skus"]}
        if wanted[2] in skus:
            return _pick_version(image, skus[wanted[2]], version, path)
    known = ", ".join(f"{i['publisher']}/{i['offer']}/{s}" for i in images for s in i["skus"])
    raise CatalogError(
        f"source image publisher={publisher!r} offer={offer!r} sku={sku!r} is not in the platform catalog "
        f"{path}; it has (publisher/offer/sku): {known}. Use one of these, or add an entry to the catalog."
    )


def _pick_version(image: dict[str, Any], sku: str, version: str, path: Path) -> CatalogEntry:
    name = f"{image['publisher']}/{image['offer']}/{sku}"
    if "recipe" in image:
        recipe = image["recipe"]
        versions = [recipe.version]
    else:
        versions = sorted(image["versions"], key=version_order)
    if version.lower() == "latest":
        exact = versions[-1]
    elif version in versions:
        exact = version
    else:
        raise CatalogError(
            f"source image {name} has no version {version!r} in the platform catalog {path}; "
            f"known versions: {', '.join(versions)} (or use 'latest')."
        )
    common = {"publisher": image["publisher"], "offer": image["offer"], "sku": sku, "exact_version": exact}
    if "recipe" in image:
        return CatalogEntry(kind="recipe", recipe=image["recipe"], **common)
    source = image["versions"][exact]
    return CatalogEntry(kind="url", url=source["url"], sha256=source["sha256"].lower(), **common)


def load_catalog(path: Path = DEFAULT_CATALOG) -> list[dict[str, Any]]:
    """The catalog's images, checked; each recipe is parsed into a ``Recipe``."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CatalogError(f"platform catalog {path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise CatalogError(f"platform catalog {path} is not valid JSON: {exc}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list):
        raise CatalogError(f"platform catalog {path}: expected an object with an 'images' list")
    return [_check_image(image, f"{path}: images[{i}]") for i, image in enumerate(images)]


def _check_image(image: Any, where: str) -> dict[str, Any]:
    if not isinstance(image, dict):
        raise CatalogError(f"{where}: expected an object")
    for field in ("publisher", "offer"):
        if not isinstance(image.get(field), str) or not image[field]:
            raise CatalogError(f"{where}.{field}: required, a non-empty string")
    skus = image.get("skus")
    if not isinstance(skus, list) or not skus or not all(isinstance(s, str) and s for s in skus):
        raise CatalogError(f"{where}.skus: required, a non-empty list of strings")
    if ("recipe" in image) == ("versions" in image):
        raise CatalogError(f"{where}: give exactly one of 'recipe' (offline build) or 'versions' (URLs)")
    if "recipe" in image:
        return {**image, "recipe": _parse_recipe(image["recipe"], f"{where}.recipe")}
    versions = image["versions"]
    if not isinstance(versions, dict) or not versions:
        raise CatalogError(f"{where}.versions: expected an object mapping version -> {{url, sha256}}")
    for version, source in versions.items():
        here = f"{where}.versions[{version!r}]"
        if not re.fullmatch(r"[0-9]+(\.[0-9]+)*", version):
            raise CatalogError(f"{here}: a version is dotted integers, like 22.04.202505160")
        if not isinstance(source, dict) or not isinstance(source.get("url"), str):
            raise CatalogError(f"{here}.url: required, a string")
        sha = source.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha):
            raise CatalogError(f"{here}.sha256: required, 64 hex digits (the published SHA256SUMS line)")
    return image


def _parse_recipe(raw: Any, where: str) -> Recipe:
    if not isinstance(raw, dict):
        raise CatalogError(f"{where}: expected an object")
    fields = {
        "revision": int,
        "suite": str,
        "mirror": str,
        "security_mirror": str,
        "disk_size_gib": int,
        "packages": list,
        "path_exclude": list,
    }
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise CatalogError(f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    for name, kind in fields.items():
        if not isinstance(raw.get(name), kind) or isinstance(raw.get(name), bool):
            raise CatalogError(f"{where}.{name}: required, of type {kind.__name__}")
    for name in ("packages", "path_exclude"):
        if not all(isinstance(item, str) and item for item in raw[name]):
            raise CatalogError(f"{where}.{name}: expected a list of non-empty strings")
    if raw["revision"] < 0 or raw["disk_size_gib"] < 2:
        raise CatalogError(f"{where}: revision must be >= 0 and disk_size_gib >= 2")
    return Recipe(**{**raw, "packages": tuple(raw["packages"]), "path_exclude": tuple(raw["path_exclude"])})
