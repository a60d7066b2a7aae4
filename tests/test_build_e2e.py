"""Real image builds through real Airflow (`airflow dags test`), each checking a whole path end to end.

Each build boots a real QEMU VM (~75 s to SSH under software emulation), so these are few and each checks a lot.
The Debian base image comes from the platform catalog's bootstrap recipe, cached in $GOLDSMITH_CACHE.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from goldsmith.airflow_env import AIRFLOW, airflow_environ, prepare
from goldsmith.local import disk

pytestmark = [pytest.mark.vm, pytest.mark.airflow]

GOLDSMITH = str(Path(AIRFLOW).with_name("goldsmith"))
# goldsmith.secrets: served by Airflow's environment-variable secrets backend; no trace may remain anywhere.
SECRET_VAR = "var-s3cret-Qx7mZ2"
SECRET_CONN = "conn-s3cret-Kp4wN9"
GALLERY = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/golden/providers/Microsoft.Compute"
BASE_DEF = f"{GALLERY}/galleries/e2e_gallery/images/e2e-base"


def write_template(folder: Path, name: str, properties: dict, **options) -> None:
    body = {"location": "westeurope", "properties": properties,
            "goldsmith": {"retries": 0, **options}}
    (folder / f"{name}.json").write_text(json.dumps(body, indent=2))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("e2e")
    templates = root / "templates"
    templates.mkdir()
    payload = root / "payload.txt"
    payload.write_text("payload from the File customizer\n")
    write_template(templates, "e2e-base", {
        "vmProfile": {"vmSize": "Standard_D2s_v3"},
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                   "version": "latest"},
        "customize": [
            {"type": "Shell", "name": "write marker", "inline": [
                "echo 'customized by goldsmith' | sudo tee /etc/goldsmith-e2e",
                "echo streamed-output-line",
                "echo \"token: $APP_TOKEN\"",  # printed on purpose: the task log must show it masked
                "printf %s \"$APP_TOKEN:$DB_PASSWORD\" | sha256sum | sudo tee /etc/goldsmith-secret-hash"]},
            {"type": "File", "name": "payload", "sourceUri": payload.as_uri(), "destination": "/tmp/payload.txt"},
            {"type": "Shell", "name": "reboot", "inline": [
                "sudo mv /tmp/payload.txt /etc/goldsmith-payload", "sudo systemctl reboot"]},
        ],
        "validate": {"inVMValidations": [{"type": "Shell", "name": "after reboot", "inline": [
            "test -f /etc/goldsmith-e2e", "grep -q 'File customizer' /etc/goldsmith-payload"]}]},
        "distribute": [
            {"type": "VHD", "runOutputName": "vhd", "uri": (root / "out" / "e2e.vhd").as_uri()},
            {"type": "SharedImage", "runOutputName": "sig", "galleryImageId": BASE_DEF,
             "artifactTags": {"stage": "base"}},
            {"type": "ManagedImage", "runOutputName": "managed", "location": "westeurope",
             "imageId": f"{GALLERY}/images/e2e-base"},
        ],
    }, secrets={"APP_TOKEN": {"variable": "app_token"}, "DB_PASSWORD": {"connection": "app_db"}})
    write_template(templates, "e2e-failing", {
        "vmProfile": {"vmSize": "Standard_D2s_v3"},
        "source": {"type": "SharedImageVersion", "imageVersionId": f"{BASE_DEF}/versions/latest"},
        "customize": [{"type": "Shell", "name": "fails", "inline": ["echo about-to-fail", "exit 3"]}],
        "errorHandling": {"onCustomizerError": "abort"},
        "distribute": [{"type": "VHD", "runOutputName": "vhd"}],
    })
    e = airflow_environ(root / "airflow", templates, root / "home")
    e["AIRFLOW_VAR_APP_TOKEN"] = SECRET_VAR
    e["AIRFLOW_CONN_APP_DB"] = json.dumps({"conn_type": "generic", "login": "app", "password": SECRET_CONN})
    e["AIRFLOW__OPENLINEAGE__TRANSPORT"] = json.dumps(
        {"type": "file", "log_file_path": str(root / "openlineage.jsonl"), "append": True})
    # The listener emits from a forked process it kills after 10 s by default: too short on a loaded 2-core host.
    e["AIRFLOW__OPENLINEAGE__EXECUTION_TIMEOUT"] = "60"
    prepare(e)
    e["ROOT"] = str(root)
    return e


def dags_test(env: dict[str, str], dag_id: str, conf: dict | None = None) -> subprocess.CompletedProcess:
    args = [AIRFLOW, "dags", "test", dag_id] + (["-c", json.dumps(conf)] if conf else [])
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=1800)
    log = Path(env["ROOT"]) / f"{dag_id}.log"  # the whole run, for when an assertion shows only its end
    log.write_text(result.stdout + result.stderr)
    print(f"dags test {dag_id}: exit {result.returncode}, log {log}")
    return result


def log_of(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def qemu_processes(home: Path) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "qemu-system"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(home) in line]


def read_file_from_image(image: Path, path: str, work: Path, command: str = "cat") -> str:
    """Reads a file (or with command="ls", a directory) from the root filesystem inside a disk image, without
    booting or mounting it."""
    raw = work / "image.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    root = max(table["partitions"], key=lambda p: p["size"])  # the root filesystem is the big partition
    offset = root["start"] * table.get("sectorsize", 512)
    out = subprocess.run(["debugfs", "-R", f"{command} {path}", f"{raw}?offset={offset}"], check=True,
                         capture_output=True, text=True)
    raw.unlink()
    return out.stdout


def test_build_customize_reboot_validate_and_distribute_everywhere(env: dict[str, str], tmp_path: Path) -> None:
    home, root = Path(env["GOLDSMITH_HOME"]), Path(env["ROOT"])
    result = dags_test(env, "e2e-base")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "streamed-output-line" in result.stdout + result.stderr  # customizer output reaches the task log

    outputs = json.loads(subprocess.run([GOLDSMITH, "run-outputs", "e2e-base", "--json"], env=env, check=True,
                                        capture_output=True, text=True).stdout)["value"]
    by_name = {o["name"]: o["properties"] for o in outputs}
    assert {n: p["provisioningState"] for n, p in by_name.items()} == dict.fromkeys(("managed", "sig", "vhd"),
                                                                                     "Succeeded")

    vhd = root / "out" / "e2e.vhd"
    assert by_name["vhd"]["artifactUri"] == vhd.as_uri()
    footer = disk.read_vhd_footer(vhd)
    assert footer["disk_type_name"] == "fixed" and footer["checksum_ok"]
    assert footer["current_size"] % (1024 * 1024) == 0
    assert vhd.stat().st_size == footer["current_size"] + 512

    gallery = json.loads(subprocess.run([GOLDSMITH, "gallery", "list", "--json"], env=env, check=True,
                                        capture_output=True, text=True).stdout)
    definition = next(g for g in gallery if g["id"].lower() == BASE_DEF.lower())
    version = definition["versions"][-1]
    assert by_name["sig"]["artifactId"] == version["id"]
    prov = version["provenance"]
    assert prov["source"]["type"] == "PlatformImage" and prov["source"]["exactVersion"]
    assert prov["template"] == "e2e-base" and prov["templateDigest"].startswith("sha256:")
    assert prov["dagId"] == "e2e-base" and prov["runId"]
    assert version["artifactTags"] == {"stage": "base"}

    image = Path(version["path"])
    assert read_file_from_image(image, "/etc/goldsmith-e2e", tmp_path) == "customized by goldsmith\n"
    assert "File customizer" in read_file_from_image(image, "/etc/goldsmith-payload", tmp_path)
    assert read_file_from_image(image, "/etc/machine-id", tmp_path).strip() == ""  # generalized
    # The build VM's later boots skipped cloud-init; the image's first boot runs it.
    assert "goldsmith-build-vm" not in read_file_from_image(image, "/etc", tmp_path, command="ls")

    assert qemu_processes(home) == []
    assert not any((home / "staging").iterdir())

    # OpenLineage (file transport): the source image in, the gallery image out, the version details in a facet.
    events = [json.loads(line) for line in (root / "openlineage.jsonl").read_text().splitlines() if line.strip()]
    done = next(e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"].endswith("distribute.sig"))
    assert [(d["namespace"], d["name"]) for d in done["inputs"]] == [("platform-image", "debian/debian-12/12")]
    assert [(d["namespace"], d["name"]) for d in done["outputs"]] == [("arm", BASE_DEF.lower())]
    facet = done["run"]["facets"]["goldsmith_image"]
    assert facet["artifactId"] == version["id"] and facet["sourceExactVersion"] == prov["source"]["exactVersion"]

    # The secrets reached the script (the image holds their hash) and left no trace: not in the task logs
    # (masked), the XCom table, run outputs, gallery records, OpenLineage events or any file the build wrote.
    expected_hash = hashlib.sha256(f"{SECRET_VAR}:{SECRET_CONN}".encode()).hexdigest()
    assert read_file_from_image(image, "/etc/goldsmith-secret-hash", tmp_path).split()[0] == expected_hash
    assert "token: ***" in log_of(result)
    xcom = sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db").execute("SELECT value FROM xcom").fetchall()
    assert xcom and not any(secret in str(row) for row in xcom for secret in (SECRET_VAR, SECRET_CONN))
    for secret in (SECRET_VAR, SECRET_CONN):
        assert secret not in log_of(result)
        leaks = subprocess.run(["grep", "-rlaF", secret, str(root), str(home)], capture_output=True, text=True)
        assert leaks.stdout == "", leaks.stdout


def test_failing_customizer_fails_its_task_and_abort_keeps_the_vm(env: dict[str, str]) -> None:
    home = Path(env["GOLDSMITH_HOME"])
    result = dags_test(env, "e2e-failing")
    log = result.stdout + result.stderr
    assert result.returncode != 0
    assert "about-to-fail" in log and "exit code 3" in log
    assert "errorHandling is 'abort'" in log
    kept = list((home / "staging").iterdir())
    assert len(kept) == 1 and len(qemu_processes(home)) == 1
    vm = json.loads((kept[0] / "vm.json").read_text())
    os.kill(vm["pid"], 9)
    subprocess.run(["rm", "-rf", str(kept[0])], check=True)

    # The same template with cleanup (a trigger-form Param): nothing outlives the failed build.
    result = dags_test(env, "e2e-failing", {"onCustomizerError": "cleanup"})
    assert result.returncode != 0 and "exit code 3" in result.stdout + result.stderr
    assert qemu_processes(home) == []
    assert not any((home / "staging").iterdir())
