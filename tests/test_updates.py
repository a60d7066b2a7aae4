"""Pending updates against a real apt repository on loopback (tests/apt_repo.py): what `"rebuild": "onUpdates"`
and the SBOM policy gate read, without a VM."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from apt_repo import serving_apt_repo
from goldsmith import runoutputs, sbom, updates
from goldsmith.template.model import SbomPolicy
from sshd_fixture import free_port


def status(**versions: str) -> str:
    return "".join(f"Package: {name}\nStatus: install ok installed\nArchitecture: all\nVersion: {version}\n"
                   "Description: test\n\n" for name, version in versions.items())


def image_sbom(sources: list[str], **versions: str) -> dict:
    inv = sbom.Inventory(tuple(sbom.parse_dpkg_status(status(**versions))), {"ID": "debian", "VERSION_ID": "12"},
                         tuple(sources))
    return sbom.cyclonedx(inv, name="app", version="run", serial_key="run")


@pytest.fixture
def repo(tmp_path: Path):
    with serving_apt_repo(tmp_path / "repo") as r:
        r.publish("gs-tool", "1.0-1", "stable")
        r.publish("gs-lib", "2.0-1", "stable")
        yield r


def test_no_updates_then_updates_security_first(repo) -> None:
    doc = image_sbom([repo.source_line("stable"), repo.source_line("stable-security")],
                     **{"gs-tool": "1.0-1", "gs-lib": "2.0-1", "not-in-archive": "9"})
    fetch = updates.http_fetch()
    assert updates.pending(doc, fetch) == []  # stable-security has no index yet: nothing there

    repo.publish("gs-tool", "1.0-2", "stable")
    repo.publish("gs-lib", "2.0-1+sec1", "stable-security")
    repo.publish("gs-tool", "1.0-1+sec1", "stable-security")  # older than stable's 1.0-2: stable's wins
    found = updates.pending(doc, fetch)
    assert [str(u) for u in found] == ["gs-lib 2.0-1 → 2.0-1+sec1 (stable-security)", "gs-tool 1.0-1 → 1.0-2 (stable)"]
    assert [u.name for u in updates.pending(doc, fetch, suites=["stable"])] == ["gs-tool"]


def test_the_build_vms_view_of_this_host_is_mapped(repo) -> None:
    """A local build VM recorded its source as 10.0.2.2:<port>; this host reads it on loopback."""
    repo.publish("gs-tool", "1.1-1", "stable")
    doc = image_sbom([repo.source_line("stable", host="10.0.2.2")], **{"gs-tool": "1.0-1"})
    assert [u.available for u in updates.pending(doc, updates.http_fetch(updates.LOCAL_GUEST_ALIASES))] == ["1.1-1"]


def test_gate_fails_or_warns_on_security_updates(repo) -> None:
    repo.publish("gs-tool", "1.0-2", "stable")
    repo.publish("gs-lib", "2.0-2", "stable-security")
    doc = image_sbom([repo.source_line("stable"), repo.source_line("stable-security")],
                     **{"gs-tool": "1.0-1", "gs-lib": "2.0-1"})
    fetch = updates.http_fetch()
    assert updates.gate(doc, SbomPolicy(pendingUpdates="fail"), fetch) == (
        ["pending update: gs-lib 2.0-1 → 2.0-2 (stable-security)"], [])
    assert updates.gate(doc, SbomPolicy(pendingUpdates="warn", updateSuites=["stable"]), fetch) == (
        [], ["pending update: gs-tool 1.0-1 → 1.0-2 (stable)"])


def test_unreachable_archive_and_foreign_schemes() -> None:
    port = free_port()
    doc = image_sbom([f"deb http://127.0.0.1:{port}/debian stable main"], **{"gs-tool": "1.0-1"})
    with pytest.raises(updates.UpdatesError, match=rf"http://127.0.0.1:{port}/debian/dists/stable/main/binary-amd64"):
        updates.pending(doc, updates.http_fetch())
    # A file: source names a path in the build VM; it is never read on this host.
    doc = image_sbom(["deb [trusted=yes] file:/etc stable main"], **{"gs-tool": "1.0-1"})
    assert updates.pending(doc, updates.http_fetch()) == []


def test_since_last_build_reads_the_recorded_sbom(repo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the plan step of an `onUpdates` template asks: the newest successful build's SBOM against its archives."""
    from goldsmith.operators.steps import _without_updates
    from goldsmith.template.loader import load_template
    from goldsmith.template.plan import make_plan

    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path / "home"))
    assert updates.since_last_build("app", "local") is None
    doc = image_sbom([repo.source_line("stable", host="10.0.2.2")], **{"gs-tool": "1.0-1"})
    runoutputs.write_document("app", "run1", sbom.FILE_NAME, sbom.dumps(doc))
    runoutputs.record_result("app", "run1", succeeded=True, digest="d", source={})
    runoutputs.record_result("app", "run2", succeeded=False, digest="d", source={})
    assert updates.since_last_build("app", "local") == ("run1", [])

    template = tmp_path / "app.json"
    template.write_text('{"location": "westeurope", "properties": {"source": {"type": "PlatformImage", '
                        '"publisher": "Debian", "offer": "debian-12", "sku": "12", "version": "latest"}, '
                        '"distribute": [{"type": "VHD", "runOutputName": "vhd"}]}, '
                        '"goldsmith": {"rebuild": "onUpdates"}}')
    plan = make_plan(load_template(str(template)))
    log = logging.getLogger("test")
    assert "no newer version of any installed package" in _without_updates(plan, log)
    repo.publish("gs-tool", "1.0-2", "stable")
    assert _without_updates(plan, log) is None
    assert updates.since_last_build("app", "local")[1][0].available == "1.0-2"
