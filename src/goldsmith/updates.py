"""Pending package updates of a built image, found without booting a VM (`"rebuild": "onUpdates"`, the gate).

The image's SBOM records its installed packages and the apt sources of the build VM. For each source this
reads the archive's index (`dists/SUITE/COMPONENT/binary-ARCH/Packages[.xz|.gz]`, or `SUITE/Packages` of a flat
repository) over HTTP(S) and lists every installed package the archive now carries in a newer version —
security suites first. Only http(s) sources are read (a `file:` or `cdrom:` source names the build VM's disk,
not this host's). Indexes are compared, not installed, so their signatures are not checked: a forged index can
at worst start a rebuild, which installs through apt's own verification.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from debian.deb822 import Deb822

from goldsmith import sbom

FETCH_TIMEOUT = 30  # seconds per index file
# The local backend's build VM (QEMU user network) sees this host's loopback as 10.0.2.2.
LOCAL_GUEST_ALIASES = {"10.0.2.2": "127.0.0.1"}
_INDEXES = (("Packages.xz", lzma.decompress), ("Packages.gz", gzip.decompress), ("Packages.bz2", bz2.decompress),
            ("Packages", lambda b: b))

Fetch = Callable[[str], bytes | None]  # the body of a URL, None if it does not exist


class UpdatesError(Exception):
    """An archive could not be read; the message names the URL and why."""


@dataclass(frozen=True)
class Update:
    name: str
    arch: str
    installed: str
    available: str
    suite: str

    def __str__(self) -> str:
        return f"{self.name} {self.installed} → {self.available} ({self.suite})"


@dataclass(frozen=True)
class Source:
    uri: str
    suite: str
    components: tuple[str, ...]
    archs: tuple[str, ...] = ()

    @classmethod
    def parse(cls, line: str) -> Source | None:
        """A one-line `deb [opts] URI SUITE [COMPONENT...]` source; None for anything else."""
        words = line.split()
        if not words or words[0] != "deb":
            return None
        words, archs = words[1:], ()
        if words and words[0].startswith("["):
            opts = []
            while words:
                opts.append(words.pop(0))
                if opts[-1].endswith("]"):
                    break
            for opt in " ".join(opts).strip("[]").split():
                key, _, value = opt.partition("=")
                if key == "arch":
                    archs = tuple(value.split(","))
        if len(words) < 2:
            return None
        return cls(words[0].rstrip("/"), words[1], tuple(words[2:]), archs)

    def index_dirs(self, archs: Iterable[str]) -> list[str]:
        if self.suite.endswith("/"):  # a flat repository: the suite is a path, no components
            return [f"{self.uri}/{self.suite.strip('/')}".rstrip("/") if self.suite != "/" else self.uri]
        archs = [a for a in (self.archs or archs)]
        return [f"{self.uri}/dists/{self.suite}/{c}/binary-{a}" for c in self.components for a in archs]


def http_fetch(aliases: Mapping[str, str] | None = None) -> Fetch:
    """Reads URLs over HTTP(S). `aliases` maps a host as the build VM saw it to the host as this machine reaches
    it (the local backend's user-mode network shows this host as 10.0.2.2)."""
    def fetch(url: str) -> bytes | None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            return None
        host = (aliases or {}).get(parts.hostname or "")
        if host:
            url = parts._replace(netloc=parts.netloc.replace(parts.hostname, host, 1)).geturl()
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT) as response:  # noqa: S310 (http(s) only)
                return response.read()
        except urllib.error.HTTPError as e:
            if e.code in (403, 404, 410):
                return None
            raise UpdatesError(f"{url}: HTTP {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            raise UpdatesError(f"{url}: {getattr(e, 'reason', e)}") from None
    return fetch


def read_index(directory: str, fetch: Fetch) -> Iterable[Deb822]:
    """The paragraphs of the first index form the archive has (xz, gz, bz2, plain)."""
    for name, decompress in _INDEXES:
        body = fetch(f"{directory}/{name}")
        if body is None:
            continue
        try:
            text = decompress(body).decode("utf-8", "replace")
        except (OSError, lzma.LZMAError, ValueError) as e:
            raise UpdatesError(f"{directory}/{name}: not a readable index ({e})") from None
        return list(Deb822.iter_paragraphs(text.splitlines(keepends=True)))
    return []


def pending(doc: Mapping[str, Any], fetch: Fetch, suites: Iterable[str] | None = None) -> list[Update]:
    """Installed packages of the SBOM `doc` with a newer version in its apt sources (only `suites`, if given),
    security suites first, then by name."""
    installed = {p.key: p for p in sbom.packages(doc).values() if p.kind == "deb"}
    archs = sorted({p.arch for p in installed.values() if p.arch and p.arch != "all"}) or ["amd64"]
    wanted = set(suites) if suites is not None else None
    best: dict[str, Update] = {}
    for line in sbom.apt_sources(doc):
        source = Source.parse(line)
        if source is None or (wanted is not None and source.suite not in wanted):
            continue
        for directory in source.index_dirs(archs):
            for para in read_index(directory, fetch):
                key = f"{para.get('Package')}:{para.get('Architecture', '')}"
                have = installed.get(key)
                if have is None or sbom.compare_versions(para.get("Version", ""), have.version) <= 0:
                    continue
                update = Update(have.name, have.arch, have.version, para["Version"], source.suite.strip("/") or "/")
                seen = best.get(key)
                if seen is None or sbom.compare_versions(update.available, seen.available) > 0 or (
                        update.available == seen.available and _security(update.suite) and not _security(seen.suite)):
                    best[key] = update
    return sorted(best.values(), key=lambda u: (not _security(u.suite), u.name, u.arch))


def _security(suite: str) -> bool:
    return "security" in suite


def gate(doc: Mapping[str, Any], policy: Any, fetch: Fetch) -> tuple[list[str], list[str]]:
    """The template's SBOM policy (goldsmith.sbom in the template) on the document: (what fails the build,
    what is only logged)."""
    problems = [f"forbidden package {p.name} {p.version} (matches goldsmith.sbom.forbiddenPackages)"
                for p in sbom.forbidden(doc, policy.forbiddenPackages)]
    warnings: list[str] = []
    if policy.pendingUpdates != "ignore":
        found = [u for u in pending(doc, fetch, policy.updateSuites)
                 if policy.updateSuites is not None or _security(u.suite)]
        (problems if policy.pendingUpdates == "fail" else warnings).extend(f"pending update: {u}" for u in found)
    return problems, warnings


def since_last_build(template: str, backend: str) -> tuple[str, list[Update]] | None:
    """(run id, pending updates) for the template's newest successful build with an SBOM; None without one."""
    from goldsmith import changes

    last = changes.last_built_sbom(template)
    if last is None:
        return None
    run_id, doc = last
    return run_id, pending(doc, http_fetch(LOCAL_GUEST_ALIASES if backend == "local" else None))
