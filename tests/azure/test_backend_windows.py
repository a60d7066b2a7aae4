"""Windows customizers, validators and sysprep through Run Command, against a scripted Windows guest
(armdouble/winguest.py): each test says how the guest behaves (exit codes, restarts, update rounds,
failures) and asserts how Goldsmith reacts."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from armdouble.winguest import WindowsGuest
from test_backend import WINDOWS, drive, env, images, make_build  # noqa: F401 - env and images are fixtures

from goldsmith import buildsbom, sbom
from goldsmith.azure.backend import AzureBackend
from goldsmith.core import BuildError


@pytest.fixture
def guest(arm_double) -> WindowsGuest:
    guest = WindowsGuest()
    arm_double.windows_run_command = guest
    return guest


@contextlib.contextmanager
def windows_vm(tmp_path, images: str, customize: list[dict], validate: list[dict] | None = None
               ) -> Iterator[AzureBackend]:
    """A provisioned Windows build VM for these steps; cleanup runs after."""
    backend = AzureBackend(make_build(tmp_path, {
        "source": WINDOWS, "customize": customize, "validate": {"inVMValidations": validate or []},
        "distribute": [{"type": "SharedImage", "runOutputName": "sig",
                        "galleryImageId": f"{images}/providers/Microsoft.Compute/galleries/golden/images/windows"}]}))
    source = backend.resolve_source()
    drive(backend.prepare_staging)
    try:
        drive(lambda: backend.provision(source))
        yield backend
    finally:
        drive(lambda: backend.cleanup(keep_vm=False))


def customize_all(backend: AzureBackend) -> list[dict[str, Any]]:
    return [drive(lambda: backend.customize(step)) for step in backend.plan.customize_steps()]


def failure(call) -> str:
    with pytest.raises(BuildError) as e:
        drive(call)
    return str(e.value)


SETTINGS = {"type": "PowerShell", "name": "settings", "inline": ["Set-Content C:\\marker.txt 'built'"],
            "validExitCodes": [0, 3010]}


def test_an_exit_code_in_valid_exit_codes_passes_and_another_fails_with_its_output(env, guest, images, tmp_path):
    guest.on("Set-Content C:\\marker.txt", exit_code=3010, stdout="a restart is pending\n", times=1)
    guest.on("Set-Content C:\\marker.txt", exit_code=5, stdout="step one\n", stderr="Access is denied.\n")
    with windows_vm(tmp_path, images, [SETTINGS]) as backend:
        [step] = backend.plan.customize_steps()
        assert drive(lambda: backend.customize(step)) == {"step": "customize.0_settings"}
        message = failure(lambda: backend.customize(step))  # a retry of the step runs the script again
    assert message == ("customize.0_settings: PowerShell 'settings' exited with 5 (validExitCodes [0, 3010]); last "
                       "output:\n    step one\n    Access is denied.")
    assert sum("Set-Content C:\\marker.txt" in s for s in guest.scripts) == 2


def test_a_run_command_that_fails_in_the_agent_fails_the_step(env, guest, images, tmp_path):
    guest.on("Set-Content C:\\marker.txt", fail="the VM agent is not ready")
    with windows_vm(tmp_path, images, [SETTINGS]) as backend:
        message = failure(lambda: customize_all(backend))
    assert "PowerShell 'settings' exited with -1" in message and "the VM agent is not ready" in message


def test_a_restart_is_waited_out_and_a_vm_that_does_not_restart_fails(env, guest, images, tmp_path):
    restart = {"type": "WindowsRestart", "restartCheckCommand": "echo back", "restartTimeout": "10m"}
    with windows_vm(tmp_path, images, [restart]) as backend:
        customize_all(backend)
        assert guest.boots == 1
        check = guest.scripts[-1]
        assert "echo back" in check and "AddSeconds(600)" in check
        guest.ignores_restart = True
        message = failure(lambda: customize_all(backend))
    assert message == ("customize.0_windowsrestart: the VM did not come back from the restart:\n"
                       "    the VM did not restart within restartTimeout")


def test_a_script_that_restarts_the_vm_itself_is_followed_by_a_windows_restart(env, guest, images, tmp_path):
    guest.on("Install-WindowsFeature", reboot=True, stdout="Success Restart Needed\n")
    steps = [{"type": "PowerShell", "name": "feature", "inline": ["Install-WindowsFeature Web-Server -Restart"]},
             {"type": "WindowsRestart"}]
    with windows_vm(tmp_path, images, steps) as backend:
        customize_all(backend)
    assert guest.boots == 2  # the script's own restart, then the customizer's


def test_windows_update_runs_rounds_until_nothing_needs_a_restart(env, guest, images, tmp_path):
    guest.updates = [True, True]
    update = {"type": "WindowsUpdate", "searchCriteria": "IsInstalled=0", "updateLimit": 40}
    with windows_vm(tmp_path, images, [update]) as backend:
        customize_all(backend)
    rounds = [s for s in guest.scripts if "Microsoft.Update.Session" in s]
    assert len(rounds) == 3 and guest.boots == 2  # installed, restart, installed, restart, nothing left
    assert "Search('IsInstalled=0')" in rounds[0] and "-ge 40" in rounds[0]


def test_windows_update_fails_on_a_failed_round_and_on_endless_restarts(env, guest, images, tmp_path):
    update = {"type": "WindowsUpdate"}
    with windows_vm(tmp_path, images, [update]) as backend:
        guest.on("Microsoft.Update.Session", exit_code=1, stdout="installed 1 update(s), result code 4\n", times=1)
        assert failure(lambda: customize_all(backend)) == (
            "customize.0_windowsupdate: Windows Update failed:\n    installed 1 update(s), result code 4")
        guest.updates = [True] * 11
        assert failure(lambda: customize_all(backend)) == (
            "customize.0_windowsupdate: updates still wanted a restart after 10 rounds")


def test_a_failing_windows_validation_fails_the_validate_step(env, guest, images, tmp_path):
    guest.on("Test-Path C:\\marker.txt", exit_code=1, stdout="False\n")
    check = {"type": "PowerShell", "name": "check", "inline": ["if (-not (Test-Path C:\\marker.txt)) { exit 1 }"]}
    with windows_vm(tmp_path, images, [], [check]) as backend:
        [step] = backend.plan.validate_steps()
        message = failure(lambda: backend.validate(step))
    assert message == ("validate.0_check: validation failed: PowerShell 'check' exited with 1 (validExitCodes [0]); "
                       "last output:\n    False")


def test_sysprep_success_generalizes_and_its_failure_fails_generalize(env, arm_double, guest, images, tmp_path):
    guest.sysprep_exit_code = 1
    with windows_vm(tmp_path, images, []) as backend:
        message = failure(backend.generalize)
        assert message.startswith("generalize: sysprep failed:\n") and "Sysprep failed" in message
        guest.sysprep_exit_code = 0
        assert drive(backend.generalize) == {"generalized": True}
        vm = arm_double.get(f"{backend.group}/providers/Microsoft.Compute/virtualMachines/goldsmith-vm")
        assert vm["tags"]["goldsmith.deprovisioned"] == "true"
    assert sum("Sysprep.exe" in s for s in guest.scripts) == 2


def test_the_sbom_lists_what_the_guest_has_installed(env, guest, images, tmp_path):
    guest.updates = [True]
    with windows_vm(tmp_path, images, [{"type": "WindowsUpdate"}]) as backend:
        customize_all(backend)
        drive(backend.generalize)
        bom = buildsbom.ref(backend.build)
    doc = json.loads(buildsbom.path(backend.build).read_text())
    assert bom["packages"] == 3  # Edge and two hotfixes, one of them installed by the update round
    assert {"KB5044277", "KB5000001"} <= set(sbom.packages(doc))


def test_every_generated_script_parses_as_powershell(env, guest, images, tmp_path):
    payload = tmp_path / "tool.cfg"
    payload.write_bytes(b"setting=1\n")
    guest.updates = [True]
    steps = [SETTINGS, {"type": "File", "name": "config", "sourceUri": payload.as_uri(), "destination": "C:\\t.cfg"},
             {"type": "WindowsRestart", "restartCheckCommand": "echo 'back'"},
             {"type": "WindowsUpdate", "filters": ["exclude:$_.Title -like '*Preview*'", "include:$true"]}]
    with windows_vm(tmp_path, images, steps) as backend:
        customize_all(backend)
        drive(backend.generalize)
    errors = guest.parse_errors()
    if errors is None:
        pytest.skip("no PowerShell parser: install pwsh to syntax-check the generated scripts")
    assert errors == {}, {i: (guest.scripts[i][:200], e) for i, e in errors.items()}
