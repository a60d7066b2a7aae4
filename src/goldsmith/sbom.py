"""What is installed in an image version: a CycloneDX 1.5 SBOM (or SPDX 2.3), and the diff between two.

The build VM's package database is read just before generalizing (`collect_linux`: dpkg's status file, the
apt sources and os-release, over the build's SSH session; `windows_script`/`parse_windows` for the installed
programs and updates of a Windows VM through Run Command). The document is rendered once, stored beside the
artifact (`sbom.cdx.json`), and referred to by its sha256 and package count (`SbomRef`) in the provenance, the
asset event and lineage. The apt sources travel inside the document (metadata properties `goldsmith:apt:source`):
`goldsmith.updates` reads them to tell, without a VM, whether the archives now carry newer versions.

Invariants: one component per installed package (dpkg `Status: install ok installed`), keyed by name and
architecture; the document's bytes are canonical (sorted keys), so equal content has an equal digest apart from
its serial number and timestamp, which identify the version it describes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping

from debian.deb822 import Deb822
from debian.debian_support import Version
from packageurl import PackageURL

from goldsmith.secrets import strip_secrets, strip_uri

SPEC_VERSION = "1.5"
FILE_NAME = "sbom.cdx.json"
PROP_SOURCE = "goldsmith:apt:source"
PROP_KIND = "goldsmith:kind"
PROP_SCRIPT = "goldsmith:script"  # "SHA256 URI" of each script and file the template referenced
_NAMESPACE = uuid.UUID("0b7e4d1a-2c61-4f7e-9a3e-5d0c6f1b9e22")

# Read in one SSH command: dpkg's database, where apt fetches from, and which distribution this is.
LINUX_COMMAND = (
    "printf '%s\\n' '--- os-release'; cat /etc/os-release; "
    "for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do "
    "[ -f \"$f\" ] && { printf '%s\\n' \"--- apt $f\"; cat \"$f\"; echo; }; done; "
    "printf '%s\\n' '--- dpkg'; cat /var/lib/dpkg/status"
)


class SbomError(Exception):
    """An SBOM could not be read or made; the message says which and why."""


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    arch: str = ""
    kind: str = "deb"  # deb, windows-program, windows-update
    source: str = ""  # the Debian source package, when it differs
    supplier: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}:{self.arch}" if self.arch else self.name


@dataclass(frozen=True)
class Inventory:
    """What one collection found in a VM."""

    packages: tuple[Package, ...]
    os: Mapping[str, str] = field(default_factory=dict)  # os-release: ID, VERSION_ID, VERSION_CODENAME, ...
    apt_sources: tuple[str, ...] = ()  # one-line form: "deb [opts] URI SUITE COMPONENT..."


@dataclass(frozen=True)
class SbomRef:
    """How provenance refers to an SBOM: the document is found beside the artifact by `path` (or blob URI)."""

    format: str
    sha256: str
    packages: int
    uri: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"format": self.format, "sha256": self.sha256, "packages": self.packages, "uri": self.uri}


# --- reading a VM's package database -------------------------------------------------------------------------


def parse_dpkg_status(text: str) -> list[Package]:
    packages = []
    for para in Deb822.iter_paragraphs(text.splitlines(keepends=True)):
        if para.get("Status", "").split()[-1:] != ["installed"] or not para.get("Package"):
            continue
        source = para.get("Source", "").split(" ")[0]
        packages.append(Package(para["Package"], para.get("Version", ""), para.get("Architecture", ""),
                                source="" if source == para["Package"] else source,
                                supplier=para.get("Maintainer", "")))
    return sorted(packages, key=lambda p: p.key)


def parse_os_release(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and name.strip() and not name.startswith("#"):
            out[name.strip()] = value.strip().strip('"').strip("'")
    return out


def parse_apt_sources(name: str, text: str) -> list[str]:
    """Every `deb` source of a sources.list(.d) file, in one-line form; deb822 `.sources` files included."""
    if name.endswith(".sources"):
        lines = []
        for para in Deb822.iter_paragraphs(text.splitlines(keepends=True)):
            if "deb" not in para.get("Types", "").split() or para.get("Enabled", "yes").lower() == "no":
                continue
            opts = {k: para[k] for k in ("Signed-By", "Trusted", "Architectures") if k in para and "\n" not in para[k]}
            prefix = (" [" + " ".join(f"{k.lower()}={v.replace(' ', ',')}" for k, v in opts.items()) + "]") if opts else ""
            for uri in para.get("URIs", "").split():
                for suite in para.get("Suites", "").split():
                    lines.append(f"deb{prefix} {uri} {suite} {para.get('Components', '')}".rstrip())
        return lines
    return [line.split("#", 1)[0].strip() for line in text.splitlines()
            if line.split("#", 1)[0].strip().startswith("deb ")]


def parse_linux_collection(output: str) -> Inventory:
    """The output of LINUX_COMMAND."""
    sections: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines(keepends=True):
        if line.startswith("--- "):
            current = line[4:].strip()
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    packages = parse_dpkg_status("".join(sections.get("dpkg", [])))
    if not packages:
        raise SbomError("no dpkg database (/var/lib/dpkg/status) in the build VM: only Debian-family Linux images "
                        "get an SBOM from the local backend")
    sources = [s for name, body in sections.items() if name.startswith("apt ")
               for s in parse_apt_sources(name[4:], "".join(body))]
    return Inventory(tuple(packages),
                     parse_os_release("".join(sections.get("os-release", []))), tuple(sources))


def collect_linux(run: Any) -> Inventory:
    """`run(command)` returns (exit code, stdout) from the build VM (any communicator)."""
    code, output = run(LINUX_COMMAND)
    if "--- dpkg" not in output:
        raise SbomError(f"reading the package database in the build VM failed (exit {code}): {output[-300:]}")
    return parse_linux_collection(output)


# Prints one JSON document: the installed programs (both registry views) and the installed updates.
WINDOWS_SCRIPT = r"""
$ErrorActionPreference = 'Stop'
$keys = 'HKLM:\Software\Microsoft\Windows\CurrentVersion\Uninstall\*',
        'HKLM:\Software\WOW6432Node\Microsoft\Windows\CurrentVersion\Uninstall\*'
$programs = Get-ItemProperty $keys -ErrorAction SilentlyContinue | Where-Object { $_.DisplayName } |
  ForEach-Object { @{ name = $_.DisplayName; version = [string]$_.DisplayVersion; publisher = [string]$_.Publisher } }
$updates = Get-HotFix | ForEach-Object { @{ id = $_.HotFixID; description = [string]$_.Description } }
$os = Get-CimInstance Win32_OperatingSystem
Write-Output ('goldsmith-sbom:' + (@{ os = @{ ID = 'windows'; NAME = $os.Caption; VERSION_ID = $os.Version };
  programs = @($programs); updates = @($updates) } | ConvertTo-Json -Depth 4 -Compress))
"""
WINDOWS_MARKER = "goldsmith-sbom:"


def parse_windows(output: str) -> Inventory:
    line = next((ln for ln in output.splitlines() if ln.startswith(WINDOWS_MARKER)), None)
    if line is None:
        raise SbomError("the Windows inventory script printed no result line: " + output[-300:])
    try:
        doc = json.loads(line[len(WINDOWS_MARKER):])
        programs = [Package(p["name"], p.get("version") or "", kind="windows-program", supplier=p.get("publisher") or "")
                    for p in doc.get("programs") or []]
        updates = [Package(u["id"], "", kind="windows-update", supplier="Microsoft Corporation")
                   for u in doc.get("updates") or []]
    except (ValueError, KeyError, TypeError) as e:
        raise SbomError(f"the Windows inventory is not what the script prints: {e}") from None
    unique = {p.key: p for p in programs + updates}
    return Inventory(tuple(sorted(unique.values(), key=lambda p: p.key)),
                     {k: str(v) for k, v in (doc.get("os") or {}).items()})


# --- rendering -------------------------------------------------------------------------------------------------


def purl(p: Package, os: Mapping[str, str]) -> str | None:
    if p.kind != "deb":
        return None
    qualifiers = {"arch": p.arch} if p.arch else {}
    if os.get("ID") and os.get("VERSION_ID"):
        qualifiers["distro"] = f"{os['ID']}-{os['VERSION_ID']}"
    return PackageURL("deb", os.get("ID") or "debian", p.name, p.version, qualifiers or None).to_string()


def cyclonedx(inv: Inventory, *, name: str, version: str, serial_key: str, timestamp: str | None = None,
              scripts: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The CycloneDX 1.5 document of the image `name`@`version`; `serial_key` (the run key) makes the serial
    number stable across retries of the same build. `scripts` (uri -> sha256, the plan's checksums) and the apt
    sources are recorded without credentials (query strings hold SAS tokens; apt allows user:password@)."""
    components = []
    for p in inv.packages:
        c: dict[str, Any] = {"type": "library" if p.kind == "deb" else "application", "bom-ref": f"{p.kind}:{p.key}",
                             "name": p.name, **({"version": p.version} if p.version else {})}
        if ref := purl(p, inv.os):
            c["purl"] = ref
        if p.supplier:
            c["supplier"] = {"name": p.supplier}
        props = [{"name": PROP_KIND, "value": p.kind}]
        props += [{"name": "goldsmith:deb:source", "value": p.source}] if p.source else []
        c["properties"] = props
        components.append(c)
    os_name = inv.os.get("ID") or "unknown"
    components.insert(0, {"type": "operating-system", "bom-ref": f"os:{os_name}", "name": os_name,
                          "version": inv.os.get("VERSION_ID", ""),
                          "description": inv.os.get("PRETTY_NAME") or inv.os.get("NAME") or os_name})
    return {
        "bomFormat": "CycloneDX", "specVersion": SPEC_VERSION,
        "serialNumber": f"urn:uuid:{uuid.uuid5(_NAMESPACE, serial_key)}", "version": 1,
        "metadata": {
            "timestamp": timestamp or datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tools": {"components": [{"type": "application", "name": "goldsmith"}]},
            "component": {"type": "operating-system", "bom-ref": "image", "name": name, "version": version},
            "properties": [{"name": PROP_SOURCE, "value": strip_secrets(s)} for s in inv.apt_sources] + [
                {"name": PROP_SCRIPT, "value": f"{sha} {strip_uri(uri)}"} for uri, sha in sorted((scripts or {}).items())],
        },
        "components": components,
        "dependencies": [{"ref": "image", "dependsOn": [c["bom-ref"] for c in components]}],
    }


def spdx(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The same packages as an SPDX 2.3 JSON document."""
    meta = doc["metadata"]
    image = meta["component"]
    packages = [{"SPDXID": "SPDXRef-image", "name": image["name"], "versionInfo": image["version"],
                 "downloadLocation": "NOASSERTION", "filesAnalyzed": False, "primaryPackagePurpose": "OPERATING-SYSTEM"}]
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                      "relatedSpdxElement": "SPDXRef-image"}]
    for i, c in enumerate(doc.get("components", [])):
        ident = f"SPDXRef-Package-{i}"
        p: dict[str, Any] = {"SPDXID": ident, "name": c["name"], "versionInfo": c.get("version") or "NOASSERTION",
                             "downloadLocation": "NOASSERTION", "filesAnalyzed": False,
                             "supplier": f"Organization: {c['supplier']['name']}" if c.get("supplier") else "NOASSERTION"}
        if c.get("purl"):
            p["externalRefs"] = [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                                  "referenceLocator": c["purl"]}]
        packages.append(p)
        relationships.append({"spdxElementId": "SPDXRef-image", "relationshipType": "CONTAINS",
                              "relatedSpdxElement": ident})
    return {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{image['name']}@{image['version']}",
        "documentNamespace": f"https://goldsmith.invalid/spdx/{doc['serialNumber'].removeprefix('urn:uuid:')}",
        "creationInfo": {"created": meta["timestamp"], "creators": ["Tool: goldsmith"]},
        "packages": packages, "relationships": relationships,
    }


def dumps(doc: Mapping[str, Any]) -> bytes:
    return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()


def ref_for(data: bytes, uri: str = "") -> SbomRef:
    doc = json.loads(data)
    return SbomRef(f"CycloneDX-{doc['specVersion']}", hashlib.sha256(data).hexdigest(), len(packages(doc)), uri)


# --- reading documents back: packages, diff, policy ------------------------------------------------------------


def packages(doc: Mapping[str, Any]) -> dict[str, Package]:
    """The packages of a CycloneDX document this module wrote, by key (name:arch)."""
    out = {}
    for c in doc.get("components", []):
        if c.get("type") == "operating-system":
            continue
        props = {p["name"]: p["value"] for p in c.get("properties", [])}
        arch = ""
        if c.get("purl"):
            arch = PackageURL.from_string(c["purl"]).qualifiers.get("arch", "")
        p = Package(c["name"], c.get("version", ""), arch, props.get(PROP_KIND, "deb"),
                    props.get("goldsmith:deb:source", ""), (c.get("supplier") or {}).get("name", ""))
        out[p.key] = p
    return out


def apt_sources(doc: Mapping[str, Any]) -> list[str]:
    return [p["value"] for p in doc.get("metadata", {}).get("properties", []) if p["name"] == PROP_SOURCE]


def scripts(doc: Mapping[str, Any]) -> dict[str, str]:
    """uri -> sha256 of the scripts and files the build's template referenced."""
    pairs = [p["value"].split(" ", 1) for p in doc.get("metadata", {}).get("properties", []) if p["name"] == PROP_SCRIPT]
    return {uri: sha for sha, uri in pairs}


def compare_versions(a: str, b: str) -> int:
    """dpkg's order (epochs, ~); other version strings compare the same way, which orders dotted numbers."""
    va, vb = Version(a or "0"), Version(b or "0")
    return (va > vb) - (va < vb)


@dataclass(frozen=True)
class Diff:
    added: tuple[Package, ...]
    removed: tuple[Package, ...]
    upgraded: tuple[tuple[Package, Package], ...]  # (old, new)
    downgraded: tuple[tuple[Package, Package], ...]

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.upgraded or self.downgraded)

    def lines(self) -> list[str]:
        return ([f"+ {p.name} {p.version}".rstrip() for p in self.added]
                + [f"- {p.name} {p.version}".rstrip() for p in self.removed]
                + [f"↑ {o.name} {o.version} → {n.version}" for o, n in self.upgraded]
                + [f"↓ {o.name} {o.version} → {n.version}" for o, n in self.downgraded])

    def as_dict(self) -> dict[str, Any]:
        return {"added": [[p.name, p.version] for p in self.added],
                "removed": [[p.name, p.version] for p in self.removed],
                "upgraded": [[o.name, o.version, n.version] for o, n in self.upgraded],
                "downgraded": [[o.name, o.version, n.version] for o, n in self.downgraded]}


def diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> Diff:
    a, b = packages(old), packages(new)
    changed = [(a[k], b[k]) for k in sorted(a.keys() & b.keys()) if a[k].version != b[k].version]
    return Diff(tuple(b[k] for k in sorted(b.keys() - a.keys())), tuple(a[k] for k in sorted(a.keys() - b.keys())),
                tuple(c for c in changed if compare_versions(c[0].version, c[1].version) < 0),
                tuple(c for c in changed if compare_versions(c[0].version, c[1].version) > 0))


def forbidden(doc: Mapping[str, Any], patterns: Iterable[str]) -> list[Package]:
    """Packages whose name matches one of the glob `patterns` (`telnet*`, `nis`)."""
    patterns = list(patterns)
    return [p for p in packages(doc).values() if any(fnmatch.fnmatchcase(p.name, pat) for pat in patterns)]
