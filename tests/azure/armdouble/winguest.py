"""A scripted Windows guest for the ARM double's Windows VMs, whose Run Commands no PowerShell runs here.

A test says how the guest behaves and asserts how Goldsmith reacts:

    guest = WindowsGuest()
    guest.on("Set-Content C:\\marker.txt", exit_code=3010, stdout="needs a restart")
    guest.updates = [True, False]          # WindowsUpdate: round 1 installs and wants a restart, round 2 too,
                                           # then "no updates to install"
    guest.sysprep_exit_code = 1            # sysprep fails
    arm_double.windows_run_command = guest

Without a rule, a script behaves as Windows would run Goldsmith's own scripts (goldsmith/azure/windows.py),
by what it does rather than by canned text:
- the boot-time report of a restart prints the guest's boot time; the restart it starts (detached, after a
  pause) reboots the guest unless `ignores_restart`, so its boot time moves on;
- the restart check compares the boot time it was given with the guest's: it passes once the guest
  rebooted, and fails like the script's own timeout otherwise;
- a Windows Update round takes the next entry of `updates` (True: installs and needs a restart);
- sysprep exits with `sysprep_exit_code` and, on 0, reports the generalized image state;
- the software inventory (the SBOM script) lists `programs` and the installed `hotfixes` (each Windows
  Update round that installs adds one);
- anything else exits 0 with no output.
A rule may also `reboot` the guest (a script that restarts it) or `fail` (the Run Command itself fails).
Every script received is in `scripts`; `parse_errors()` syntax-checks them with PowerShell's own parser
when `pwsh` is installed.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass, field

BOOT_MARKER = "goldsmith-boot:"
REBOOT_MARKER = "goldsmith: reboot required"


@dataclass
class Rule:
    pattern: str  # a substring of the script
    exit_code: int = 0
    stdout: str = ""
    stderr: str = ""
    reboot: bool = False
    fail: str | None = None  # the Run Command fails with this message (the agent, not the script)
    times: int | None = None  # applies this many times (None: always)


@dataclass
class WindowsGuest:
    updates: list[bool] = field(default_factory=list)
    sysprep_exit_code: int = 0
    ignores_restart: bool = False
    programs: list[dict] = field(default_factory=lambda: [
        {"name": "Microsoft Edge", "version": "131.0.2903.70", "publisher": "Microsoft Corporation"}])
    hotfixes: list[str] = field(default_factory=lambda: ["KB5044277"])
    boots: int = 0
    scripts: list[str] = field(default_factory=list)
    rules: list[Rule] = field(default_factory=list)

    def __post_init__(self):
        self._lock = threading.Lock()
        self._start = datetime.datetime(2025, 1, 1, tzinfo=datetime.timezone.utc)

    def on(self, pattern: str, **behaviour) -> Rule:
        rule = Rule(pattern, **behaviour)
        self.rules.append(rule)
        return rule

    @property
    def boot_time(self) -> datetime.datetime:
        return self._start + datetime.timedelta(minutes=self.boots)

    def __call__(self, vm: str, command_id: str, script: str, parameters: list) -> tuple[int, str, str]:
        with self._lock:
            self.scripts.append(script)
            return self._run(script)

    def _run(self, script: str) -> tuple[int, str, str]:
        for rule in self.rules:
            if rule.pattern in script and rule.times != 0:
                if rule.times is not None:
                    rule.times -= 1
                if rule.fail:
                    raise RuntimeError(rule.fail)
                if rule.reboot:
                    self.boots += 1
                return rule.exit_code, rule.stdout, rule.stderr
        if BOOT_MARKER in script and "LastBootUpTime" in script:  # the restart script
            out = f"{BOOT_MARKER}{self.boot_time.isoformat()}\n"
            if not self.ignores_restart:
                self.boots += 1
            return 0, out, ""
        if m := re.search(r"\$before = \[datetime\]::Parse\('([^']*)'\)", script):  # the restart check
            if datetime.datetime.fromisoformat(m.group(1)) < self.boot_time:
                return 0, "restarted\n", ""
            return 1, "the VM did not restart within restartTimeout\n", ""
        if "Microsoft.Update.Session" in script:
            if not self.updates:
                return 0, "no updates to install\n", ""
            reboot = self.updates.pop(0)
            self.hotfixes.append(f"KB50{len(self.hotfixes):05d}")
            return 0, "selected: 2025-01 Cumulative Update\ninstalled 1 update(s), result code 2\n" + (
                REBOOT_MARKER + "\n" if reboot else ""), ""
        if "goldsmith-sbom:" in script and "Get-HotFix" in script:
            return 0, "goldsmith-sbom:" + json.dumps({
                "os": {"ID": "windows", "NAME": "Microsoft Windows Server 2019 Datacenter", "VERSION_ID": "10.0.17763"},
                "programs": self.programs, "updates": [{"id": h, "description": "Security Update"}
                                                       for h in self.hotfixes]}) + "\n", ""
        if "Sysprep.exe" in script:
            if self.sysprep_exit_code:
                return self.sysprep_exit_code, "", "Sysprep failed: see C:\\Windows\\System32\\Sysprep\\Panther\n"
            return 0, "IMAGE_STATE_UNDEPLOYABLE\nIMAGE_STATE_GENERALIZE_RESEAL_TO_OOBE\n", ""
        return 0, "", ""

    def parse_errors(self) -> dict[int, list[str]] | None:
        """PowerShell's parser's errors per script index (empty: all parse), or None without `pwsh`."""
        pwsh = shutil.which("pwsh")
        if pwsh is None:
            return None
        check = ("$errors = @{}; $i = 0; foreach ($s in (Get-Content -Raw $args[0] | ConvertFrom-Json)) { "
                 "$e = $null; [void][System.Management.Automation.Language.Parser]::ParseInput($s, [ref]$null, "
                 "[ref]$e); if ($e) { $errors[\"$i\"] = @($e | ForEach-Object Message) }; $i++ }; "
                 "$errors | ConvertTo-Json -Compress")
        with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
            json.dump(self.scripts, f)
            f.flush()
            out = subprocess.run([pwsh, "-NoProfile", "-NonInteractive", "-Command", check, f.name],
                                 capture_output=True, text=True, check=True).stdout.strip()
        return {int(k): v for k, v in json.loads(out or "{}").items()}
