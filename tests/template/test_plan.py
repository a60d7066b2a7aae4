"""The build plan: content digest, checksums of referenced files, step task ids, backend checks."""

from __future__ import annotations

import hashlib
import json

import pytest

from goldsmith.template.loader import TemplateError, load_template
from goldsmith.template.plan import BuildPlan, make_plan

WINDOWS_CUSTOMIZERS = [
    {"type": "PowerShell", "inline": ["Get-Date"]},
    {"type": "WindowsRestart"},
    {"type": "WindowsUpdate"},
]


def plan_of(path, **kwargs) -> BuildPlan:
    return make_plan(load_template(path), **kwargs)


def no_reads(uri: str) -> str:
    raise AssertionError(f"read {uri}")


def test_digest_is_stable_across_key_order_and_whitespace(write, body):
    first = plan_of(write(body, "a.json"))
    reordered = {"properties": dict(reversed(body["properties"].items())), "location": body["location"]}
    second = plan_of(write(json.dumps(reordered, separators=(",", ":")), "b.json"))
    assert first.digest == second.digest and first.digest.startswith("sha256:")


def test_digest_ignores_the_envelope_and_read_only_fields(write, body):
    before = plan_of(write(body)).digest
    body.update(name="other", apiVersion="2022-02-14", type="Microsoft.VirtualMachineImages/imageTemplates")
    body["properties"]["provisioningState"] = "Succeeded"
    assert plan_of(write(body)).digest == before


@pytest.mark.parametrize("change", [
    lambda b: b["properties"].update(vmProfile={"vmSize": "Standard_D4s_v3"}),
    lambda b: b.update(location="westus"),
    lambda b: b.update(goldsmith={"backend": "azure"}),
])
def test_digest_changes_with_what_is_built(write, body, change):
    before = plan_of(write(body)).digest
    change(body)
    assert plan_of(write(body)).digest != before


def test_digest_changes_when_a_referenced_script_changes(write, body, tmp_path):
    script = tmp_path / "setup.sh"
    script.write_text("apt-get install -y nginx\n")
    body["properties"]["customize"] = [{"type": "Shell", "scriptUri": "file://<templateDir>/setup.sh"}]
    path = write(body)
    first = plan_of(path)
    assert first.checksums == {f"file://{script}": hashlib.sha256(script.read_bytes()).hexdigest()}
    assert plan_of(path).digest == first.digest
    script.write_text("apt-get install -y apache2\n")
    assert plan_of(path).digest != first.digest


def test_declared_checksum_is_used_without_reading(write, body):
    declared = "AB" * 32
    body["properties"]["customize"] = [
        {"type": "Shell", "scriptUri": "https://example.com/a.sh", "sha256Checksum": declared},
        {"type": "File", "sourceUri": "file:///nonexistent/f", "destination": "/tmp/f", "sha256Checksum": declared},
    ]
    plan = plan_of(write(body), checksum=no_reads)
    assert plan.checksums == {"https://example.com/a.sh": declared.lower(), "file:///nonexistent/f": declared.lower()}


def test_every_referenced_file_is_checksummed(write, body):
    body["properties"]["customize"] = [{"type": "File", "sourceUri": "https://x/f", "destination": "/tmp/f"}]
    body["properties"]["validate"] = {"inVMValidations": [{"type": "Shell", "scriptUri": "https://x/check.sh"}]}
    body["properties"]["optimize"] = {"workload": {"state": "Enabled", "scriptUri": "https://x/w.sh"}}
    plan = plan_of(write(body), checksum=lambda uri: "sum:" + uri)
    assert plan.checksums == {u: "sum:" + u for u in ["https://x/f", "https://x/check.sh", "https://x/w.sh"]}


def test_unreadable_or_unsupported_sources_are_problems(write, body, tmp_path):
    # An ftp:// scriptUri is refused when the template loads (tests/test_hostile.py).
    body["properties"]["customize"] = [{"type": "Shell", "scriptUri": "file://<templateDir>/missing.sh"}]
    with pytest.raises(TemplateError) as e:
        plan_of(write(body))
    assert [p.message for p in e.value.problems] == [
        f"can't read 'file://{tmp_path}/missing.sh' to checksum it: "
        f"[Errno 2] No such file or directory: '{tmp_path}/missing.sh'",
    ]


def test_step_task_ids(write, body):
    body["properties"]["customize"] = [
        {"type": "Shell", "name": "setup", "inline": ["true"]},
        {"type": "Shell", "name": "Install Teams (v2)!", "inline": ["true"]},
        {"type": "File", "sourceUri": "https://x/f", "destination": "/tmp/f"},
    ]
    body["properties"]["validate"] = {"inVMValidations": [{"type": "Shell", "name": "smoke test", "inline": ["true"]}]}
    body["properties"]["distribute"] = [
        {"type": "VHD", "runOutputName": "vhd.main"},
        {"type": "ManagedImage", "runOutputName": "img", "imageId": "/i", "location": "westus"},
    ]
    plan = plan_of(write(body), checksum=lambda uri: "0")
    assert [s.task_id for s in plan.customize_steps()] == [
        "customize.0_setup", "customize.1_Install_Teams_v2", "customize.2_file"]
    assert [s.task_id for s in plan.validate_steps()] == ["validate.0_smoke_test"]
    assert [s.task_id for s in plan.distribute_steps()] == ["distribute.vhd.main", "distribute.img"]
    assert plan.customize_steps()[1].local_id == "1_Install_Teams_v2"
    assert plan.distribute_steps()[1].item.imageId == "/i"


def test_windows_customizers_are_refused_by_the_local_backend(write, body):
    body["properties"]["customize"] = WINDOWS_CUSTOMIZERS
    body["properties"]["validate"] = {"inVMValidations": [{"type": "PowerShell", "inline": ["Get-Date"]}]}
    with pytest.raises(TemplateError) as e:
        plan_of(write(body))
    assert [(p.path, p.message.split(" needs")[0]) for p in e.value.problems] == [
        ("properties.customize[0].type", "'PowerShell'"),
        ("properties.customize[1].type", "'WindowsRestart'"),
        ("properties.customize[2].type", "'WindowsUpdate'"),
        ("properties.validate.inVMValidations[0].type", "'PowerShell'"),
    ]
    assert e.value.problems[0].message.endswith('set "goldsmith": {"backend": "azure"} in the template')


def test_windows_customizers_are_refused_with_bare_properties_paths(write, body):
    body["properties"]["customize"] = WINDOWS_CUSTOMIZERS[:1]
    with pytest.raises(TemplateError) as e:
        plan_of(write(body["properties"]))
    assert [p.path for p in e.value.problems] == ["customize[0].type"]


def test_windows_customizers_are_accepted_by_the_azure_backend(write, body):
    body["properties"]["customize"] = WINDOWS_CUSTOMIZERS
    body["goldsmith"] = {"backend": "azure"}
    plan = plan_of(write(body))
    assert [s.task_id for s in plan.customize_steps()] == [
        "customize.0_powershell", "customize.1_windowsrestart", "customize.2_windowsupdate"]


def test_plan_survives_json_round_trip(write, body):
    """The `plan` task pushes it to XCom as JSON; later tasks read it back."""
    body["properties"]["errorHandling"] = {"onCustomizerError": "abort"}
    plan = plan_of(write(body))
    again = BuildPlan.model_validate_json(plan.model_dump_json())
    assert again == plan
    assert (again.build_timeout_minutes, again.error_handling.onCustomizerError) == (240, "abort")
