"""SBOMs: collected from a real package database over SSH, valid against the published CycloneDX 1.5 schema
(tests/schemas/cyclonedx-1.5) and the SPDX project's validator; diffs, the policy gate, Windows inventories,
and the `goldsmith sbom` / `goldsmith diff` commands over gallery artifacts."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
from referencing import Registry, Resource

from goldsmith import changes, cli, lineage, sbom, updates
from goldsmith.local.gallery import LocalGallery
from goldsmith.template.model import SbomPolicy
from sshd_fixture import running_sshd

SCHEMAS = Path(__file__).parent / "schemas" / "cyclonedx-1.5"
BASE = "http://cyclonedx.org/schema/"
DEF = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/app"

STATUS = """\
Package: openssl
Status: install ok installed
Architecture: amd64
Version: 3.0.15-1~deb12u1
Maintainer: Debian OpenSSL Team <pkg-openssl-devel@alioth-lists.debian.net>
Description: Secure Sockets Layer toolkit

Package: libssl3
Status: install ok installed
Architecture: amd64
Source: openssl
Version: 3.0.15-1~deb12u1
Description: Secure Sockets Layer toolkit - shared libraries

Package: telnet
Status: install ok installed
Architecture: all
Version: 0.17+2.4-2
Description: transitional package

Package: removed-but-configured
Status: deinstall ok config-files
Architecture: amd64
Version: 1.0
Description: only its conffiles are left
"""
OS_RELEASE = 'PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nID=debian\nVERSION_ID="12"\nVERSION_CODENAME=bookworm\n'


def validate_cyclonedx(doc: dict) -> None:
    """Against the vendored CycloneDX 1.5 JSON schema, with its spdx and jsf references and format checks."""
    resources = {BASE + p.name: Resource.from_contents(json.loads(p.read_text())) for p in SCHEMAS.glob("*.json")}
    schema = json.loads((SCHEMAS / "bom-1.5.SNAPSHOT.schema.json").read_text())
    validator = jsonschema.Draft7Validator(schema, registry=Registry().with_resources(resources.items()),
                                           format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors[:5])
    # The vendored schema dropped `version` from `required` (see its README); our documents carry it.
    assert doc["version"] == 1 and doc["serialNumber"].startswith("urn:uuid:")


def validate_spdx(doc: dict) -> None:
    from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import JsonLikeDictParser
    from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

    messages = validate_full_spdx_document(JsonLikeDictParser().parse(json.loads(json.dumps(doc))), "SPDX-2.3")
    assert not messages, [m.validation_message for m in messages[:5]]


def inventory(status: str = STATUS, sources: tuple[str, ...] = ()) -> sbom.Inventory:
    return sbom.Inventory(tuple(sbom.parse_dpkg_status(status)), sbom.parse_os_release(OS_RELEASE), sources)


def test_the_schema_check_can_fail() -> None:
    doc = sbom.cyclonedx(inventory(), name="app", version="run1", serial_key="k")
    doc["components"][1]["type"] = "package"  # not a CycloneDX component type
    with pytest.raises(AssertionError, match="is not one of"):
        validate_cyclonedx(doc)


def test_dpkg_status_to_cyclonedx_and_spdx() -> None:
    doc = sbom.cyclonedx(inventory(sources=("deb http://deb.debian.org/debian bookworm main",)), name="app",
                         version="run1", serial_key="dag/run1", timestamp="2026-12-01T00:00:00Z")
    validate_cyclonedx(doc)
    validate_spdx(sbom.spdx(doc))
    found = sbom.packages(doc)
    assert sorted(found) == ["libssl3:amd64", "openssl:amd64", "telnet:all"]  # config-files only: not installed
    assert found["libssl3:amd64"].source == "openssl"
    ssl = next(c for c in doc["components"] if c["name"] == "openssl")
    assert ssl["purl"] == "pkg:deb/debian/openssl@3.0.15-1~deb12u1?arch=amd64&distro=debian-12"
    assert doc["components"][0] == {"type": "operating-system", "bom-ref": "os:debian", "name": "debian",
                                    "version": "12", "description": "Debian GNU/Linux 12 (bookworm)"}
    assert sbom.apt_sources(doc) == ["deb http://deb.debian.org/debian bookworm main"]
    private = sbom.cyclonedx(inventory(sources=("deb https://bot:s3cret@apt.example.com/deb stable main",)),
                             name="app", version="run1", serial_key="k")
    assert sbom.apt_sources(private) == ["deb https://apt.example.com/deb stable main"]  # no credential recorded
    again = sbom.cyclonedx(inventory(), name="app", version="run1", serial_key="dag/run1")
    assert again["serialNumber"] == doc["serialNumber"]  # a retried build describes itself with the same serial
    ref = sbom.ref_for(sbom.dumps(doc), "file:///x")
    assert (ref.format, ref.packages, len(ref.sha256)) == ("CycloneDX-1.5", 3, 64)


def test_collected_over_ssh_from_a_real_package_database() -> None:
    """This host's own dpkg database through a real sshd: every installed package, nothing else."""
    if not Path("/var/lib/dpkg/status").exists():
        pytest.skip("no dpkg database on this host")
    with running_sshd() as server, server.communicator() as comm:
        comm.wait_until_ready(30, cloud_init=False)

        def run(command: str) -> tuple[int | None, str]:
            lines: list[str] = []
            return comm.run(command, on_line=lines.append).exit_code, "\n".join(lines)

        inv = sbom.collect_linux(run)
    expected = subprocess.run(["dpkg-query", "-W", "-f", "${db:Status-Status} ${Package}:${Architecture} ${Version}\n"],
                              capture_output=True, text=True, check=True).stdout.splitlines()
    installed = {line.split(" ", 2)[1]: line.split(" ", 2)[2] for line in expected if line.startswith("installed ")}
    assert {p.key: p.version for p in inv.packages} == installed
    assert inv.os["ID"] == subprocess.run([". /etc/os-release; echo $ID"], shell=True, capture_output=True,
                                          text=True).stdout.strip()
    doc = sbom.cyclonedx(inv, name="host", version="1", serial_key="host")
    validate_cyclonedx(doc)
    validate_spdx(sbom.spdx(doc))


def test_apt_sources_one_line_and_deb822() -> None:
    deb822 = ("Types: deb deb-src\nURIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
              "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
              "Types: deb\nURIs: http://security.debian.org/debian-security\nSuites: bookworm-security\n"
              "Components: main\nEnabled: no\n")
    assert sbom.parse_apt_sources("debian.sources", deb822) == [
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm main contrib",
        "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-updates main contrib"]
    assert sbom.parse_apt_sources("x.list", "# off\ndeb-src http://a b c\ndeb [trusted=yes] http://h:1 s main # c\n") == [
        "deb [trusted=yes] http://h:1 s main"]
    source = updates.Source.parse("deb [trusted=yes arch=amd64,arm64] http://h:1/ s main extra")
    assert source == updates.Source("http://h:1", "s", ("main", "extra"), ("amd64", "arm64"))
    assert updates.Source.parse("deb http://h/flat ./").index_dirs(["amd64"]) == ["http://h/flat/."]


def test_no_dpkg_database_is_a_clear_error() -> None:
    with pytest.raises(sbom.SbomError, match="no dpkg database"):
        sbom.collect_linux(lambda command: (
            1, "--- os-release\nID=fedora\n--- dpkg\ncat: /var/lib/dpkg/status: No such file or directory\n"))
    with pytest.raises(sbom.SbomError, match="failed \\(exit 255\\)"):
        sbom.collect_linux(lambda command: (255, "sudo: a terminal is required"))


def test_diff_between_versions() -> None:
    old = sbom.cyclonedx(inventory(), name="app", version="1", serial_key="1")
    newer = STATUS.replace("3.0.15-1~deb12u1", "3.0.17-1~deb12u2").replace("Package: telnet", "Package: curl")
    new = sbom.cyclonedx(inventory(newer), name="app", version="2", serial_key="2")
    d = sbom.diff(old, new)
    assert d.lines() == ["+ curl 0.17+2.4-2", "- telnet 0.17+2.4-2",
                         "↑ libssl3 3.0.15-1~deb12u1 → 3.0.17-1~deb12u2", "↑ openssl 3.0.15-1~deb12u1 → 3.0.17-1~deb12u2"]
    assert sbom.diff(new, old).downgraded and not sbom.diff(old, old)
    assert sbom.compare_versions("1:1.0", "2.0") == 1 and sbom.compare_versions("1.0~rc1", "1.0") == -1


def test_windows_inventory_from_run_command_output() -> None:
    """The line the inventory script prints (PowerShell's ConvertTo-Json of two programs and two hotfixes)."""
    output = "noise\n" + sbom.WINDOWS_MARKER + json.dumps({
        "os": {"ID": "windows", "NAME": "Microsoft Windows Server 2022 Datacenter", "VERSION_ID": "10.0.20348"},
        "programs": [{"name": "Microsoft Edge", "version": "131.0.2903.70", "publisher": "Microsoft Corporation"},
                     {"name": "7-Zip 24.08 (x64)", "version": "24.08", "publisher": ""}],
        "updates": [{"id": "KB5044281", "description": "Security Update"}, {"id": "KB5041160", "description": "Update"}],
    }) + "\n"
    inv = sbom.parse_windows(output)
    assert [(p.name, p.kind) for p in inv.packages] == [
        ("7-Zip 24.08 (x64)", "windows-program"), ("KB5041160", "windows-update"), ("KB5044281", "windows-update"),
        ("Microsoft Edge", "windows-program")]
    doc = sbom.cyclonedx(inv, name="win", version="1", serial_key="w")
    validate_cyclonedx(doc)
    validate_spdx(sbom.spdx(doc))
    assert "purl" not in doc["components"][1] and sbom.packages(doc)["KB5044281"].kind == "windows-update"
    assert "Get-HotFix" in sbom.WINDOWS_SCRIPT and "Uninstall" in sbom.WINDOWS_SCRIPT
    with pytest.raises(sbom.SbomError, match="no result line"):
        sbom.parse_windows("Get-HotFix : access denied\n")


def test_policy_forbidden_packages() -> None:
    doc = sbom.cyclonedx(inventory(), name="app", version="1", serial_key="1")
    problems, warnings = updates.gate(doc, SbomPolicy(forbiddenPackages=["telnet*", "rsh-*"]), lambda url: None)
    assert problems == ["forbidden package telnet 0.17+2.4-2 (matches goldsmith.sbom.forbiddenPackages)"]
    assert warnings == [] and updates.gate(doc, SbomPolicy(), lambda url: None) == ([], [])


# --- stored with the artifact, read back by the CLI --------------------------------------------------------------


def publish(gallery: LocalGallery, tmp: Path, run: str, status: str, created_disk: Path,
            scripts: dict[str, str]) -> None:
    doc = sbom.cyclonedx(inventory(status), name="app", version=run, serial_key=run, scripts=scripts)
    bom = tmp / f"{run}.cdx.json"
    bom.write_bytes(sbom.dumps(doc))
    provenance = {"source": {"type": "PlatformImage", "id": "Debian:debian-12:12:1", "exactVersion": run},
                  "template": "app", "templateDigest": "sha256:" + run * 8, "dagId": "app", "runId": run,
                  "parents": [], "sbom": sbom.ref_for(bom.read_bytes()).as_dict()}
    gallery.publish_version(DEF, created_disk, provenance=provenance, run_key=run, files={sbom.FILE_NAME: bom})


@pytest.fixture
def two_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("GOLDSMITH_HOME", str(home))
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    gallery = LocalGallery(home / "gallery")
    publish(gallery, tmp_path, "run1", STATUS, disk, {"file:///s/setup.sh": "a" * 64, "file:///s/old.sh": "b" * 64})
    publish(gallery, tmp_path, "run2", STATUS.replace("Version: 3.0.15-1~deb12u1", "Version: 3.0.17-1~deb12u2"), disk,
            {"file:///s/setup.sh": "c" * 64, "https://acct.blob.core.windows.net/s/new.sh?sig=SECRET": "d" * 64})
    return home


def test_cli_sbom_and_diff(two_versions: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["sbom", "app@0.0.1"]) == 0
    doc = json.loads(capsys.readouterr().out)
    validate_cyclonedx(doc)
    assert sbom.packages(doc)["openssl:amd64"].version == "3.0.15-1~deb12u1"
    assert cli.main(["sbom", "app", "--format", "spdx"]) == 0  # the newest version
    spdx = json.loads(capsys.readouterr().out)
    validate_spdx(spdx)
    assert {p["name"]: p["versionInfo"] for p in spdx["packages"]}["openssl"] == "3.0.17-1~deb12u2"

    assert cli.main(["diff", "app@0.0.1", "app@0.0.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["source: Debian:debian-12:12:1 run1 → Debian:debian-12:12:1 run2",
                         "template and scripts: sha256:run1run1run1 → sha256:run2run2run2",
                         "script removed: file:///s/old.sh", "script changed: file:///s/setup.sh",
                         "script added: https://acct.blob.core.windows.net/s/new.sh",  # never the SAS token
                         "↑ libssl3 3.0.15-1~deb12u1 → 3.0.17-1~deb12u2",
                         "↑ openssl 3.0.15-1~deb12u1 → 3.0.17-1~deb12u2"]
    assert cli.main(["diff", "--json", "app@0.0.1", "app@0.0.2"]) == 0
    assert json.loads(capsys.readouterr().out)["upgraded"][1] == ["openssl", "3.0.15-1~deb12u1", "3.0.17-1~deb12u2"]
    # What the distribute log of the second version ends with.
    assert changes.since_previous(DEF + "/versions/0.0.2")[1:] == lines[1:]
    assert "first version" in changes.since_previous(DEF + "/versions/0.0.1")[0]

    assert cli.main(["sbom", "nothing@1.0.0"]) == 1
    assert "no artifact 'nothing@1.0.0'" in capsys.readouterr().err


def test_an_sbom_changed_after_the_build_is_refused(two_versions: Path, capsys: pytest.CaptureFixture) -> None:
    artifact = lineage.find("app@0.0.1", lineage.artifacts())
    path = Path(artifact["sbom"]["uri"].removeprefix("file://"))
    path.write_text(path.read_text().replace("telnet", "telnot"))
    assert cli.main(["sbom", "app@0.0.1"]) == 1
    assert "changed after the build" in capsys.readouterr().err
