"""SBOMs and `"rebuild": "onUpdates"` through real builds (`airflow dags test`, a real QEMU VM each).

The image installs a package from a local apt repository on loopback (tests/apt_repo.py; the build VM reaches it
at 10.0.2.2) and keeps only that source, so no public archive decides the outcome. Run 1 builds; run 2 finds
nothing newer and skips; a newer package version is published; run 3 builds, and its diff names the upgrade.
Every SBOM is checked against the schema and against the dpkg database inside the image itself.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from apt_repo import serving_apt_repo
from goldsmith import sbom
from goldsmith.airflow_env import airflow_environ, prepare
from test_build_e2e import GALLERY, GOLDSMITH, dags_test, qemu_processes, read_file_from_image, write_template
from test_sbom import validate_cyclonedx

pytestmark = [pytest.mark.vm, pytest.mark.airflow]

DEF = f"{GALLERY}/galleries/sbom_gallery/images/sbom-app"
SUITE = "goldsmith-stable"


def gallery_versions(env: dict[str, str]) -> list[dict]:
    listing = json.loads(subprocess.run([GOLDSMITH, "gallery", "list", "--json"], env=env, check=True,
                                        capture_output=True, text=True).stdout)
    return next(g for g in listing if g["id"].lower() == DEF.lower())["versions"]


def packages_in_image(image: Path, work: Path) -> dict[str, str]:
    status = read_file_from_image(image, "/var/lib/dpkg/status", work)
    return {p.key: p.version for p in sbom.parse_dpkg_status(status)}


def goldsmith(env: dict[str, str], *args: str) -> str:
    return subprocess.run([GOLDSMITH, *args], env=env, check=True, capture_output=True, text=True).stdout


def test_sbom_diff_and_on_updates(tmp_path: Path, base_image: Path) -> None:
    with serving_apt_repo(tmp_path / "repo") as repo:
        repo.publish("gs-tool", "1.0-1", SUITE)
        templates = tmp_path / "templates"
        templates.mkdir()
        source = repo.source_line(SUITE, host="10.0.2.2")
        write_template(templates, "sbom-app", {
            "vmProfile": {"vmSize": "Standard_D2s_v3"},
            "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                       "version": "latest"},
            "customize": [{"type": "Shell", "name": "install from the local archive", "inline": [
                "sudo rm -f /etc/apt/sources.list /etc/apt/sources.list.d/*",
                f"echo '{source}' | sudo tee /etc/apt/sources.list.d/goldsmith-test.list",
                "sudo apt-get update -q", "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q gs-tool"]}],
            "distribute": [{"type": "SharedImage", "runOutputName": "sig", "galleryImageId": DEF}],
        }, rebuild="onUpdates", sbom={"forbiddenPackages": ["telnet*"]})
        env = airflow_environ(tmp_path / "airflow", templates, tmp_path / "home")
        prepare(env)
        env["ROOT"] = str(tmp_path)
        home = Path(env["GOLDSMITH_HOME"])

        first = dags_test(env, "sbom-app")
        assert first.returncode == 0, first.stdout[-6000:] + first.stderr[-3000:]
        assert "the first version of this target" in first.stdout + first.stderr

        second = dags_test(env, "sbom-app")
        log = second.stdout + second.stderr
        assert second.returncode == 0, log[-6000:]
        assert "carry no newer version of any installed package" in log
        assert len(gallery_versions(env)) == 1

        repo.publish("gs-tool", "1.0-2", SUITE)
        third = dags_test(env, "sbom-app")
        log = third.stdout + third.stderr
        assert third.returncode == 0, log[-6000:]
        assert f"gs-tool 1.0-1 → 1.0-2 ({SUITE})" in log  # the plan's reason to build
        assert "↑ gs-tool 1.0-1 → 1.0-2" in log  # the distribute log's diff

    v1, v2 = gallery_versions(env)
    for version in (v1, v2):
        doc = json.loads(goldsmith(env, "sbom", version["id"]))
        validate_cyclonedx(doc)
        assert version["provenance"]["sbom"]["packages"] == len(sbom.packages(doc))
        assert sbom.apt_sources(doc) == [source]
        # The SBOM is what the image holds: the dpkg database read from the disk without booting it.
        inside = packages_in_image(Path(version["path"]), tmp_path)
        assert {k: p.version for k, p in sbom.packages(doc).items()} == inside
    assert packages_in_image(Path(v1["path"]), tmp_path)["gs-tool:all"] == "1.0-1"
    assert packages_in_image(Path(v2["path"]), tmp_path)["gs-tool:all"] == "1.0-2"

    diff = goldsmith(env, "diff", f"sbom-app@{v1['version']}", f"sbom-app@{v2['version']}").splitlines()
    assert diff[1:] == ["↑ gs-tool 1.0-1 → 1.0-2"]  # same source version, same template: only the package
    assert json.loads(goldsmith(env, "sbom", "sbom-app", "--format", "spdx"))["spdxVersion"] == "SPDX-2.3"
    assert qemu_processes(home) == [] and not any((home / "staging").iterdir())
