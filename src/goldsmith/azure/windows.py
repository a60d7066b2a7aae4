"""Windows customizers and validators as PowerShell run through VM Run Command (which runs scripts as
LocalSystem, so every script runs elevated).

What Packer's powershell, windows-restart, windows-update (rgl/packer-provisioner-windows-update) and file
provisioners do over WinRM for AIB, as self-contained scripts. Values from the template are embedded as
single-quoted PowerShell strings, never interpolated. `run_customizer` drives one customizer through a
`run(key, script)` that returns the Run Command's {exitCode, output, error} (or raises Pending while it runs).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from typing import Any, Callable

from goldsmith import customizers
from goldsmith.core import BuildError

Run = Callable[[str, str], dict[str, Any]]

REBOOT_MARKER = "goldsmith: reboot required"
BOOT_MARKER = "goldsmith-boot:"
DEFAULT_SEARCH_CRITERIA = "BrowseOnly=0 and IsInstalled=0"  # AIB's documented default
MAX_UPDATE_ROUNDS = 10  # search-install-restart rounds, as Packer's windows-update provisioner loops
UPDATE_RESTART_COMMAND = 'shutdown /r /f /t 0 /c "goldsmith windows update"'
UPDATE_RESTART_SECONDS = 1800
FILE_CHUNK_BYTES = 150_000  # base64 of a chunk plus the script stays under Run Command's 256 KB script limit


def quote(value: str) -> str:
    """A single-quoted PowerShell string literal."""
    return "'" + value.replace("'", "''") + "'"


def timeout_seconds(value: str) -> int:
    """AIB's restartTimeout (`5m`, `90s`, `2h`) in seconds."""
    number, unit = re.fullmatch(r"(\d+)([smh])", value).groups()
    return int(number) * {"s": 1, "m": 60, "h": 3600}[unit]


def restart_script(restart_command: str) -> str:
    """Prints the boot time, then runs the restart command detached after a pause, so that Run Command
    reports this script's success before the VM goes down."""
    return "\n".join([
        "$boot = (Get-CimInstance Win32_OperatingSystem).LastBootUpTime.ToUniversalTime().ToString('o')",
        f"Write-Output ('{BOOT_MARKER}' + $boot)",
        "Start-Process -WindowStyle Hidden -FilePath cmd.exe -ArgumentList "
        f"@('/c', {quote('timeout /t 10 /nobreak >nul & ' + restart_command)})",
        "exit 0",
    ])


def restart_check_script(boot_before: str, check_command: str, timeout: int) -> str:
    """Waits until the VM has booted since `boot_before`, then until `check_command` (if any) succeeds."""
    lines = [
        f"$before = [datetime]::Parse({quote(boot_before)}).ToUniversalTime()",
        f"$deadline = (Get-Date).AddSeconds({timeout})",
        "while ((Get-CimInstance Win32_OperatingSystem).LastBootUpTime.ToUniversalTime() -le $before) {",
        "    if ((Get-Date) -gt $deadline) { Write-Output 'the VM did not restart within restartTimeout'; exit 1 }",
        "    Start-Sleep -Seconds 5",
        "}",
        "Write-Output 'restarted'",
    ]
    if check_command:
        lines += [
            "while ($true) {",
            f"    & cmd.exe /c {quote(check_command)}",
            "    if ($LASTEXITCODE -eq 0) { exit 0 }",
            "    if ((Get-Date) -gt $deadline) {",
            "        Write-Output 'restartCheckCommand did not succeed within restartTimeout'; exit 1",
            "    }",
            "    Start-Sleep -Seconds 5",
            "}",
        ]
    return "\n".join(lines + ["exit 0"])


def update_script(search_criteria: str, filters: list[str], update_limit: int) -> str:
    """One round of search, download and install through the Windows Update Agent API. Prints REBOOT_MARKER
    when the installed updates need a restart; the caller restarts and runs another round.

    filters, as in packer-provisioner-windows-update: `include:<expr>` / `exclude:<expr>` with `$_` the update;
    the first filter whose expression is true decides; with filters and none true, the update is skipped."""
    criteria = search_criteria or DEFAULT_SEARCH_CRITERIA
    rules = ",\n".join(
        f"    @({quote(f.split(':', 1)[0])}, [scriptblock]::Create({quote(f.split(':', 1)[1])}))" for f in filters)
    return "\n".join([
        "$ErrorActionPreference = 'Stop'",
        f"$rules = @(\n{rules}\n)" if filters else "$rules = @()",
        "$session = New-Object -ComObject Microsoft.Update.Session",
        f"$result = $session.CreateUpdateSearcher().Search({quote(criteria)})",
        "$selected = New-Object -ComObject Microsoft.Update.UpdateColl",
        "foreach ($update in $result.Updates) {",
        f"    if ($selected.Count -ge {update_limit or 1000}) {{ break }}",
        "    $take = $rules.Count -eq 0",
        "    foreach ($rule in $rules) {",
        "        if (@($update | Where-Object $rule[1]).Count -gt 0) { $take = $rule[0] -eq 'include'; break }",
        "    }",
        "    if (-not $take) { Write-Output ('skipped: ' + $update.Title); continue }",
        "    if (-not $update.EulaAccepted) { $update.AcceptEula() }",
        "    Write-Output ('selected: ' + $update.Title)",
        "    [void]$selected.Add($update)",
        "}",
        "if ($selected.Count -eq 0) { Write-Output 'no updates to install'; exit 0 }",
        "$downloader = $session.CreateUpdateDownloader(); $downloader.Updates = $selected",
        "[void]$downloader.Download()",
        "$installer = $session.CreateUpdateInstaller(); $installer.Updates = $selected",
        "$outcome = $installer.Install()",
        "Write-Output ('installed ' + $selected.Count + ' update(s), result code ' + $outcome.ResultCode)",
        f"if ($outcome.RebootRequired) {{ Write-Output {quote(REBOOT_MARKER)} }}",
        "if ($outcome.ResultCode -gt 3) { exit 1 }",  # 2 succeeded, 3 succeeded with errors, 4 failed, 5 aborted
        "exit 0",
    ])


def file_chunk_script(destination: str, data: bytes, *, first: bool, sha256: str | None) -> str:
    """Writes (first chunk) or appends one chunk of a File customizer's bytes; the last chunk, given the
    file's sha256, checks the whole file."""
    encoded = base64.b64encode(data).decode()
    lines = [
        "$ErrorActionPreference = 'Stop'",
        f"$path = {quote(destination)}",
        f"$bytes = [Convert]::FromBase64String('{encoded}')",
        "$stream = [IO.File]::Open($path, [IO.FileMode]::" + ("Create" if first else "Append") + ")",
        "try { $stream.Write($bytes, 0, $bytes.Length) } finally { $stream.Close() }",
    ]
    if sha256:
        lines += [
            "$actual = (Get-FileHash -Algorithm SHA256 -Path $path).Hash.ToLower()",
            f"if ($actual -ne {quote(sha256)}) {{ Write-Output ('sha256 mismatch: ' + $actual); exit 1 }}",
            "Write-Output ('wrote ' + (Get-Item $path).Length + ' bytes to ' + $path)",
        ]
    return "\n".join(lines + ["exit 0"])


# AIB's Windows deprovisioning (its documented C:\DeprovisioningScript.ps1), unless a customizer wrote one.
SYSPREP = r"""
if (Test-Path 'C:\DeprovisioningScript.ps1') {
    Write-Output 'running C:\DeprovisioningScript.ps1 instead of the built-in sysprep'
    & 'C:\DeprovisioningScript.ps1'
    exit $LASTEXITCODE
}
while ((Get-Service RdAgent).Status -ne 'Running') { Start-Sleep -Seconds 5 }
while ((Get-Service WindowsAzureGuestAgent).Status -ne 'Running') { Start-Sleep -Seconds 5 }
if (Test-Path $Env:SystemRoot\System32\Sysprep\unattend.xml) {
    Remove-Item $Env:SystemRoot\System32\Sysprep\unattend.xml -Force
}
& $Env:SystemRoot\System32\Sysprep\Sysprep.exe /oobe /generalize /quiet /quit /mode:vm
while ($true) {
    $state = (Get-ItemProperty HKLM:\SOFTWARE\Microsoft\Windows\CurrentVersion\Setup\State).ImageState
    Write-Output $state
    if ($state -eq 'IMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE') { break }
    Start-Sleep -Seconds 5
}
exit 0
""".strip()


def run_customizer(c: Any, key: str, name: str, run: Run, log: logging.Logger) -> None:
    """Runs the PowerShell, File, WindowsRestart or WindowsUpdate customizer (or validator) `c`, its scripts as
    Run Commands keyed `<key>/<part>`; raises BuildError saying what failed, with the output's tail."""
    if c.type == "PowerShell":
        if not c.runElevated:
            log.info("Run Command runs scripts as LocalSystem: PowerShell %r runs elevated", name)
        script = "\n".join(c.inline) if c.inline is not None else customizers.fetch(
            c.scriptUri, c.sha256Checksum or None).decode("utf-8-sig")
        result = run(f"{key}/script", script)
        if result["exitCode"] not in c.validExitCodes:
            raise BuildError(f"PowerShell {name!r} exited with {result['exitCode']} (validExitCodes "
                             f"{c.validExitCodes}); last output:\n{tail(result)}")
    elif c.type == "File":
        _file(c, key, run)
    elif c.type == "WindowsRestart":
        _restart(key, c.restartCommand, c.restartCheckCommand, timeout_seconds(c.restartTimeout), run)
    else:
        _update(c, key, run)


def _file(c: Any, key: str, run: Run) -> None:
    data = customizers.fetch(c.sourceUri, c.sha256Checksum or None)
    chunks = [data[i:i + FILE_CHUNK_BYTES] for i in range(0, len(data), FILE_CHUNK_BYTES)] or [b""]
    digest = hashlib.sha256(data).hexdigest()
    for i, chunk in enumerate(chunks):
        result = run(f"{key}/chunk{i}", file_chunk_script(c.destination, chunk, first=i == 0,
                                                          sha256=digest if i == len(chunks) - 1 else None))
        if result["exitCode"] != 0:
            raise BuildError(f"File: writing {c.destination} failed; its directory must exist:\n{tail(result)}")


def _restart(key: str, command: str, check: str, timeout: int, run: Run) -> None:
    before = run(f"{key}/restart", restart_script(command))
    boot = next((line[len(BOOT_MARKER):] for line in before["output"].splitlines()
                 if line.startswith(BOOT_MARKER)), None)
    if boot is None:
        raise BuildError(f"the restart script did not report the boot time:\n{tail(before)}")
    after = run(f"{key}/check", restart_check_script(boot, check, timeout))
    if after["exitCode"] != 0:
        raise BuildError(f"the VM did not come back from the restart:\n{tail(after)}")


def _update(c: Any, key: str, run: Run) -> None:
    script = update_script(c.searchCriteria, c.filters, c.updateLimit)
    for round_ in range(MAX_UPDATE_ROUNDS):
        result = run(f"{key}/update{round_}", script)
        if result["exitCode"] != 0:
            raise BuildError(f"Windows Update failed:\n{tail(result)}")
        if REBOOT_MARKER not in result["output"]:
            return
        _restart(f"{key}/update{round_}", UPDATE_RESTART_COMMAND, "", UPDATE_RESTART_SECONDS, run)
    raise BuildError(f"updates still wanted a restart after {MAX_UPDATE_ROUNDS} rounds")


def tail(result: dict[str, Any], lines: int = 30) -> str:
    """The last lines of a Run Command's output and error, indented for an error message."""
    text = (result["output"] + "\n" + result["error"]).strip().splitlines()
    return "\n".join(f"    {line}" for line in text[-lines:])
