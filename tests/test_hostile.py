"""Hostile and broken input (issue #10): each case gets a clear `FILE:PATH: message` from `goldsmith validate`
(exit 1, no traceback), and in the DAG folder a placeholder DAG of its own while every other template's DAG
stays. Secrets: `goldsmith.secrets` reach scripts as environment variables and nothing Goldsmith writes keeps
a credential.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from goldsmith.cli import main
from goldsmith.dag_factory import build_dags, dag_id_for
from goldsmith.secrets import strip_secrets, strip_uri

RESOURCE = "Microsoft.VirtualMachineImages/imageTemplates"


def body(**goldsmith) -> dict:
    b = {"location": "westeurope", "properties": {
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                   "version": "latest"},
        "customize": [{"type": "Shell", "name": "s", "inline": ["true"]}],
        "distribute": [{"type": "VHD", "runOutputName": "vhd"}]}}
    if goldsmith:
        b["goldsmith"] = goldsmith
    return b


def arm_with(variables: dict, run_output_name: str, parameters: dict | None = None) -> dict:
    resource = {"type": RESOURCE, "apiVersion": "2025-10-01", "name": "x", "location": "westeurope",
                "properties": {**body()["properties"],
                               "distribute": [{"type": "VHD", "runOutputName": run_output_name}]}}
    return {"$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
            "parameters": parameters or {}, "variables": variables, "resources": [resource]}


def bomb() -> dict:
    variables = {"v0": "ab"} | {f"v{i}": f"[concat(variables('v{i-1}'),variables('v{i-1}'))]" for i in range(1, 21)}
    return arm_with(variables, "[variables('v20')]")


def chain() -> dict:
    variables = {"v0": "ab"} | {f"v{i}": f"[variables('v{i-1}')]" for i in range(1, 400)}
    return arm_with(variables, "[variables('v399')]")


def with_props(**props) -> dict:
    b = body()
    b["properties"].update(props)
    return b


# name -> (file content as JSON, or a callable making the file; the expected message, in part)
CASES = {
    "long_tag": (body(tags=["x" * 101]), "goldsmith.tags[0]: String should have at most 100 characters"),
    "surrogate": (body(owner="\ud800"), "goldsmith.owner: contains a lone UTF-16 surrogate"),
    "bad_cron": (body(schedule="61 * * * *"), "goldsmith.schedule: '61 * * * *' is not a cron expression"),
    "arm_bomb": (bomb(), "expand to more than 10000 parameter and variable references"),
    "arm_chain": (chain(), "through a chain of more than 64 variables"),
    "identity_null": ({**body(), "identity": {"type": "UserAssigned", "userAssignedIdentities": {"/id": None}}},
                      "identity.userAssignedIdentities./id: Input should be a valid dictionary"),
    "dot_output": (with_props(distribute=[{"type": "VHD", "runOutputName": ".."}]),
                   "runOutputName '..' must not start with '.'"),
    "ftp_script": (with_props(customize=[{"type": "Shell", "scriptUri": "ftp://h/x.sh"}]),
                   "Shell scriptUri 'ftp://h/x.sh' must be an https://, http:// or file:// URI"),
    "data_script": (with_props(customize=[{"type": "Shell", "scriptUri": "data:,echo"}]), "must be an https://"),
    "empty_script": (with_props(customize=[{"type": "Shell", "scriptUri": ""}]), "must be an https://"),
    "checksum_inline": (with_props(customize=[{"type": "Shell", "inline": ["true"], "sha256Checksum": "ab"}]),
                        "'sha256Checksum' checks a downloaded 'scriptUri'; remove it beside 'inline'"),
    "vm_size": (with_props(vmProfile={"vmSize": "Standard_Nope"}),
                "properties.vmProfile.vmSize: 'Standard_Nope' is not known to the local backend"),
    "param_not_object": (arm_with({}, "[parameters('p')]", {"p": "string"}),
                         "parameters.p: parameter 'p' must be an object such as"),
    "parameters_file": ({"$schema": "https://schema.management.azure.com/schemas/2019-04-01/"
                                    "deploymentParameters.json#", "parameters": {"x": {"value": 1}}},
                        "this is an ARM parameters file, not an image template: pass it to"),
    "trigger": ({"type": f"{RESOURCE}/triggers", "properties": {"kind": "SourceImage"}},
                "this is an AIB trigger resource, not an image template"),
    "secret_bad_ref": (body(secrets={"X": {"connection": "c", "variable": "v"}}),
                       "goldsmith.secrets.X: a secret comes from either 'connection'"),
    "secret_bad_name": (body(secrets={"1X": {"variable": "v"}}), "goldsmith.secrets.1X"),
}


def special_files(folder: Path) -> dict[str, str]:
    """Files that are not what their name says: name -> expected message."""
    os.mkfifo(folder / "fifo.json")
    (folder / "zero.json").symlink_to("/dev/zero")
    (folder / "loop.json").symlink_to(folder / "loop.json")
    (folder / "huge.json").write_text(json.dumps(body(description="x" * (1024 * 1024))))
    return {"fifo": "is not a regular file (a device, FIFO or socket)",
            "zero": "is not a regular file (a device, FIFO or socket)",
            "loop": "can't read: Too many levels of symbolic links",
            "huge": "over the limit of 1048576"}


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    folder = tmp_path_factory.mktemp("hostile")
    expected = {}
    for name, (content, message) in CASES.items():
        (folder / f"{name}.json").write_text(json.dumps(content))
        expected[name] = message
    expected.update(special_files(folder))
    (folder / "good.json").write_text(json.dumps(body(schedule="0 3 * * 1", tags=["team-a"])))
    return folder, expected


@pytest.mark.parametrize("name", [*CASES, "fifo", "zero", "loop", "huge"])
def test_validate_says_what_is_wrong(name, hostile, capsys):
    folder, expected = hostile
    assert main(["validate", str(folder / f"{name}.json"), str(folder / "good.json")]) == 1
    out = capsys.readouterr()
    assert expected[name] in out.out and f"{folder}/{name}.json" in out.out
    assert f"{folder}/good.json: valid" in out.out  # a bad file does not stop the others
    assert "Traceback" not in out.out + out.err


def test_every_hostile_file_becomes_its_own_placeholder_dag(hostile):
    folder, expected = hostile
    dags = build_dags(folder)
    assert "good" in dags and "plan" in dags["good"].task_dict
    for name, message in expected.items():
        dag = dags[name]
        assert list(dag.task_dict) == ["invalid_template"], name
        assert message in dag.doc_md, name


def test_names_that_collide_or_cannot_build_get_distinct_placeholder_ids(tmp_path):
    for name in ("a b", "a+b", "a_b", "goldsmith_azure_janitor", ".hidden", "n" * 65):
        (tmp_path / f"{name}.json").write_text(json.dumps(body()))
    dags = build_dags(tmp_path)
    ids = {name: dag_id_for(tmp_path / f"{name}.json") for name in ("a b", "a+b", "goldsmith_azure_janitor", ".hidden")}
    assert len(set(ids.values())) == 4 and all(i.startswith("invalid_") for i in ids.values())
    assert "plan" in dags["a_b"].task_dict  # the valid name keeps its DAG
    assert "is Goldsmith's janitor DAG: rename the file" in dags[ids["goldsmith_azure_janitor"]].doc_md
    assert "not starting with '.'" in dags[ids[".hidden"]].doc_md
    assert "is 65 characters: use at most 64" in dags[dag_id_for(tmp_path / f"{'n' * 65}.json")].doc_md


def test_a_placeholder_dag_asks_for_the_value_in_the_file_not_for_set(tmp_path):
    b = body()
    b["properties"]["distribute"][0]["runOutputName"] = "<out>"
    (tmp_path / "p.json").write_text(json.dumps(b))
    doc = build_dags(tmp_path)["p"].doc_md
    assert "give <out> a value in the template (a DAG takes no --set)" in doc and "pass --set" not in doc


def test_an_unexpected_error_is_a_placeholder_not_a_lost_folder(tmp_path, monkeypatch):
    (tmp_path / "a.json").write_text(json.dumps(body()))
    (tmp_path / "b.json").write_text(json.dumps(body()))
    import goldsmith.dag_factory as factory

    real = factory.build_dag

    def broken(loaded, *args, **kwargs):
        if loaded.name == "a":
            raise KeyError("https://u:pw@host/x?sig=SECRET")
        return real(loaded, *args, **kwargs)

    monkeypatch.setattr(factory, "build_dag", broken)
    dags = build_dags(tmp_path)
    assert "plan" in dags["b"].task_dict
    assert "Goldsmith could not make this DAG (KeyError" in dags["a"].doc_md
    assert "SECRET" not in dags["a"].doc_md and "pw@" not in dags["a"].doc_md


# --- secrets ---------------------------------------------------------------------------------------------------

def test_strip_removes_query_strings_and_user_info():
    sas = "https://acct.blob.core.windows.net/c/x.vhd?sv=2024&sig=S3CRET%3D"
    assert strip_uri(sas) == "https://acct.blob.core.windows.net/c/x.vhd"
    assert strip_uri("https://me:pw@host:8/p?q=1#f") == "https://host:8/p#f"
    assert strip_uri("file:///srv/x.vhd") == "file:///srv/x.vhd"
    text = f"upload to {sas} failed; see 'http://u:p@h/a?t=1'"
    assert strip_secrets(text) == "upload to https://acct.blob.core.windows.net/c/x.vhd failed; see 'http://h/a'"


def test_a_sas_token_stays_out_of_dag_docs_and_asset_uris(tmp_path):
    sas = "https://acct.blob.core.windows.net/vhds/x.vhd?sv=2024-01-01&sig=S3CRET"
    b = body()
    b["properties"]["distribute"][0]["uri"] = sas
    (tmp_path / "t.json").write_text(json.dumps(b))
    dag = build_dags(tmp_path)["t"]
    assert "acct.blob.core.windows.net/vhds/x.vhd" in dag.doc_md and "S3CRET" not in dag.doc_md
    outlet = dag.task_dict["distribute.vhd"].outlets[0]
    assert outlet.uri == "https://acct.blob.core.windows.net/vhds/x.vhd"


def test_airflow_dagbag_keeps_every_dag_and_serializes_each(hostile, monkeypatch):
    """Airflow's own parse of the DAG file: no import error, one DAG per file, each one storable (UTF-8 JSON)."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    from goldsmith.dag_factory import PROJECT_ROOT

    folder, expected = hostile
    monkeypatch.setenv("GOLDSMITH_TEMPLATES", str(folder))
    bag = DagBag(str(PROJECT_ROOT / "dags" / "goldsmith_dags.py"), safe_mode=False)
    assert bag.import_errors == {}
    assert set(bag.dags) == {"good", *expected}
    for dag in bag.dags.values():
        json.dumps(DagSerialization.to_dict(dag)).encode("utf-8")


# --- isolation --------------------------------------------------------------------------------------------------

def test_a_build_key_is_private_from_its_creation(tmp_path):
    from goldsmith.communicator import create_build_key

    key = tmp_path / "id_ed25519"
    create_build_key(key)
    assert key.stat().st_mode & 0o777 == 0o600
    assert key.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert key.with_suffix(".pub").read_text().startswith("ssh-ed25519 ")
    first = key.read_bytes()
    create_build_key(key)  # a retry adopts the key
    assert key.read_bytes() == first and [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_a_comma_in_a_staging_path_stays_inside_the_qemu_option(tmp_path):
    """QEMU's own parser reads the escaped path as one file name, not as an extra option."""
    import subprocess

    from goldsmith.local import qemu

    disk = tmp_path / "IT_a,file.locking=off_b" / "disk.qcow2"
    disk.parent.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1M"], check=True)
    info = subprocess.run(["qemu-img", "info", "--output=json", "--image-opts",
                           f"driver=qcow2,file.filename={qemu._opt(disk)}"], capture_output=True, text=True)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["virtual-size"] == 1024 * 1024


@pytest.mark.parametrize("source", ["*", "0.0.0.0/0", "Internet", "::/0"])
def test_azure_refuses_to_open_the_build_vms_ssh_to_everyone(source):
    from types import SimpleNamespace

    from goldsmith.azure.backend import AzureBackend
    from goldsmith.core import BuildError

    backend = SimpleNamespace(hook=SimpleNamespace(settings=SimpleNamespace(ssh_source=source), conn_id="azure"))
    with pytest.raises(BuildError, match="opens the build VM's SSH to the whole Internet"):
        AzureBackend._ssh_source(backend)
    ok = SimpleNamespace(hook=SimpleNamespace(settings=SimpleNamespace(ssh_source="203.0.113.7/32"), conn_id="a"))
    assert AzureBackend._ssh_source(ok) == "203.0.113.7/32"


def test_secrets_reach_the_script_through_a_file_that_is_gone_before_it_runs(comm, caplog):
    """Against sshd on loopback: the values are in the script's environment, on no command line or log line
    of Goldsmith's, and the 0600 file that carried them is deleted even when the script fails."""
    import hashlib
    import logging

    from goldsmith.customizers import CustomizerFailed, run_shell

    value = "it's a $ecret with spaces; and `quotes`"
    caplog.set_level(logging.DEBUG)
    lines: list[str] = []
    run_shell(comm, inline=['printf "%s" "$TOKEN" | sha256sum | cut -c1-16', 'printf "%s\\n" "$TOKEN"',
                            "ls /tmp | grep -c '^goldsmith-sec-.*\\.env$' || true",
                            "ps -eo args | grep -cF \"$TOKEN\" || true"],
              on_line=lines.append, name="sec", secrets={"TOKEN": value})
    # the script saw the exact value (its digest); printing it gives ***; no env file left while it runs;
    # only grep's own command line holds it
    assert lines == [hashlib.sha256(value.encode()).hexdigest()[:16], "***", "0", "1"]
    assert value not in caplog.text and "TOKEN" not in caplog.text.replace("(env: TOKEN)", "")
    with pytest.raises(CustomizerFailed):
        run_shell(comm, inline=["exit 4"], on_line=lines.append, name="sec", secrets={"TOKEN": value})
    assert comm.run("ls /tmp | grep -c '^goldsmith-sec-.*\\.env$' || true").tail == ["0"]
    comm.run("rm -f /tmp/goldsmith-sec-*.sh")


def test_file_sources_and_vhd_targets_stay_inside_the_allowed_folders(tmp_path, monkeypatch):
    from goldsmith import confine
    from goldsmith.customizers import FetchError, fetch

    templates = tmp_path / "include" / "templates"
    templates.mkdir(parents=True)
    (tmp_path / "include" / "scripts").mkdir()
    script = tmp_path / "include" / "scripts" / "s.sh"
    script.write_text("echo hi\n")
    monkeypatch.setenv("GOLDSMITH_TEMPLATES", str(templates))
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("GOLDSMITH_ALLOWED_PATHS", "")
    assert fetch(script.as_uri()) == b"echo hi\n"  # beside the templates folder
    (tmp_path / "include" / "scripts" / "shadow").symlink_to("/etc/shadow")
    for uri in ("file:///etc/shadow", "file:///proc/self/environ", (tmp_path / "include/scripts/shadow").as_uri()):
        with pytest.raises(FetchError, match="cannot read source .* is outside the folders templates may use"):
            fetch(uri)
    key = tmp_path / "home" / "staging" / "IT_x" / "id_ed25519"
    key.parent.mkdir(parents=True)
    key.write_text("private")
    with pytest.raises(FetchError, match="outside the folders"):  # another build's key, though under the home
        fetch(key.as_uri())
    os.mkfifo(tmp_path / "include" / "scripts" / "fifo")
    with pytest.raises(FetchError, match="is not a regular file"):
        fetch((tmp_path / "include" / "scripts" / "fifo").as_uri())
    monkeypatch.setenv("GOLDSMITH_MAX_SOURCE_BYTES", "4")
    with pytest.raises(FetchError, match="over the limit of 4"):
        fetch(script.as_uri())
    with pytest.raises(confine.ConfinementError, match="distribute.vhd.uri /etc/x.vhd is outside"):
        confine.check("/etc/x.vhd", "distribute.vhd.uri")
    monkeypatch.setenv("GOLDSMITH_ALLOWED_PATHS", "/srv/images")
    assert confine.check("/srv/images/a.vhd", "uri") == Path("/srv/images/a.vhd")


def test_validate_backend_checks_a_windows_aib_file_unchanged(tmp_path, capsys):
    b = body()
    b["properties"]["customize"] = [{"type": "PowerShell", "inline": ["Write-Host hi"]}, {"type": "WindowsRestart"}]
    (tmp_path / "win.json").write_text(json.dumps(b))
    assert main(["validate", str(tmp_path / "win.json")]) == 1
    assert "needs a Windows build VM" in capsys.readouterr().out
    assert main(["validate", "--backend", "azure", str(tmp_path / "win.json")]) == 0
    assert capsys.readouterr().out == f"{tmp_path}/win.json: valid\n"
