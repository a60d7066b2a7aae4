"""AIB's image-version rules, in one place for every backend and publisher.

Gallery image versions are `major.minor.patch` of 32-bit integers without leading zeros. A distribution's
number comes from, in order: the run's explicit version, a `.../versions/x.y.z` in `galleryImageId`, the
`versioning` scheme (Source: the source image's version; Latest: one patch above the highest), else Latest.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable

_VERSION = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)")
_INT32_MAX = 2**31 - 1


class VersionError(ValueError):
    """A version that can't name a gallery image version; the message names what and the fix."""


def check(version: str, what: str) -> str:
    match = _VERSION.fullmatch(version)
    if not match or any(int(part) > _INT32_MAX for part in match.groups()):
        raise VersionError(
            f"{what} '{version}' is not a gallery image version: use major.minor.patch, "
            "32-bit integers without leading zeros (e.g. 1.0.0)"
        )
    return version


def key(version: str) -> tuple[int, ...]:
    """Version order (numeric by part); a part that is not a number sorts below every number."""
    return tuple(int(p) if p.isdigit() else -1 for p in version.split("."))


def highest(versions: Iterable[str]) -> str:
    return max(versions, key=key)


def next_latest(existing: Iterable[str], major: int) -> str:
    """AIB's Latest scheme: one patch above the highest version (the highest with `major`, when major >= 0).

    AIB documents the increment but not the first version; we start a new major at major.0.0, and an empty
    gallery (major unset or 0) at 0.0.1, as 0.0.0 reads as "no version".
    """
    valid = [key(v) for v in existing if _VERSION.fullmatch(v)]
    candidates = [k for k in valid if major < 0 or k[0] == major]
    if not candidates:
        return f"{major}.0.0" if major > 0 else "0.0.1"
    top = max(candidates)
    return f"{top[0]}.{top[1]}.{top[2] + 1}"


def from_source(source_version: str | None) -> str:
    """AIB's Source scheme: the source image's version, which must be major.minor.patch of integers."""
    if not source_version:
        raise VersionError(
            "versioning scheme 'Source' names the version after the source image's version, but none was given "
            "(only PlatformImage and SharedImageVersion sources have one); use scheme 'Latest' or an explicit version"
        )
    parts = source_version.split(".")
    if len(parts) != 3 or not all(re.fullmatch(r"[0-9]+", p) and int(p) <= _INT32_MAX for p in parts):
        raise VersionError(
            f"versioning scheme 'Source': the source version '{source_version}' is not major.minor.patch of "
            "32-bit integers, so it can't name a gallery image version; use scheme 'Latest' or an explicit version"
        )
    # Platform versions carry leading zeros ("22.04.202401010"); the gallery version is the integers.
    return ".".join(str(int(p)) for p in parts)


def choose(*, explicit: str | None, in_id: str | None, versioning: Any, source_version: str | None,
           taken: Iterable[str], named: Callable[[str], str] = str) -> tuple[str, str]:
    """(number, where it came from) for a new gallery image version; `versioning` is the distribution's
    LatestVersioner/SourceVersioner or None. Raises VersionError for a number that exists (`named` says it in
    the message): AIB never overwrites a version."""
    taken = set(taken)
    if explicit:
        number, origin = check(explicit, "the explicit version"), "explicit version"
    elif in_id:
        number, origin = check(in_id, "the version in galleryImageId"), "galleryImageId"
    elif versioning is not None and versioning.scheme == "Source":
        number, origin = from_source(source_version), "versioning Source"
    else:
        major = getattr(versioning, "major", None)
        return next_latest(taken, -1 if major is None else major), "versioning Latest"
    if number in taken:
        raise VersionError(f"image version {named(number)} already exists ({origin}); AIB never overwrites a version: "
                           "publish a new version number, or delete this one first")
    return number, origin


def region(name: str) -> str:
    """Azure's canonical region name: 'East US' -> 'eastus'."""
    return name.replace(" ", "").lower()
