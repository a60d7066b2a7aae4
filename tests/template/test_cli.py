"""The real `goldsmith` console script, run as a user runs it: exit codes, output lines, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

GOLDSMITH = Path(sys.executable).parent / "goldsmith"


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run([str(GOLDSMITH), *args], capture_output=True, text=True, cwd=cwd, timeout=60)
    assert "Traceback" not in result.stderr + result.stdout
    return result


def test_console_script_is_installed():
    assert GOLDSMITH.is_file()


def test_valid_template_exits_0(write, body):
    path = write(body)
    result = run("validate", str(path))
    assert (result.returncode, result.stdout, result.stderr) == (0, f"{path}: valid\n", "")


def test_one_line_per_problem_and_other_templates_still_checked(write, body, tmp_path):
    write(body, "good.json")
    body["properties"]["distribute"][0]["aritfactTags"] = {}
    body["properties"]["buildTimeoutInMinutes"] = 961
    write(body, "bad.json")
    write('{\n  "location": \n}', "broken.json")
    result = run("validate", "bad.json", "broken.json", "good.json", "missing.json", cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == ""
    assert result.stdout.splitlines() == [
        "bad.json:properties.distribute[0].aritfactTags: unknown field 'aritfactTags' — did you mean 'artifactTags'?",
        "bad.json:properties.buildTimeoutInMinutes: Input should be less than or equal to 960",
        "broken.json:3:1: invalid JSON: Expecting value",
        "good.json: valid",
        "missing.json: no such file",
    ]


def test_placeholders_are_reported_or_allowed(write, body):
    body["location"] = "<region>"
    path = write(body)
    result = run("validate", str(path))
    assert (result.returncode, result.stdout) == (
        1, f"{path}:location: unresolved placeholder <region>: pass --set region=VALUE\n")
    result = run("validate", "--allow-placeholders", str(path))
    assert (result.returncode, result.stdout) == (0, f"{path}: valid (1 placeholders left unresolved)\n")
    assert run("validate", "--set", "region=westus", str(path)).returncode == 0


def test_render_fills_defaults_and_substitutes(write, body, tmp_path):
    body["location"] = "<region>"
    body["properties"]["distribute"][0]["runOutputName"] = "<out>"
    path = write(body)
    result = run("render", "--set", "region=westus", "--set", "out=vhd1", str(path))
    assert result.returncode == 0
    rendered = json.loads(result.stdout)
    assert rendered["location"] == "westus"
    assert rendered["properties"]["distribute"] == [{"type": "VHD", "runOutputName": "vhd1", "artifactTags": {}}]
    assert rendered["properties"]["customize"] == [] and rendered["properties"]["buildTimeoutInMinutes"] == 0
    assert rendered["goldsmith"]["backend"] == "local" and rendered["goldsmith"]["retries"] == 2
    (tmp_path / "rendered.json").write_text(result.stdout)
    assert run("validate", str(tmp_path / "rendered.json")).returncode == 0


def test_render_keeps_tokens_with_allow_placeholders(write, body):
    body["location"] = "<region>"
    body["properties"]["distribute"][0]["runOutputName"] = "<out>"
    result = run("render", "--allow-placeholders", str(write(body)))
    rendered = json.loads(result.stdout)
    assert (rendered["location"], rendered["properties"]["distribute"][0]["runOutputName"]) == ("<region>", "<out>")


def test_render_of_an_invalid_template_exits_1(write):
    path = write({"source": {"type": "ISO"}})
    result = run("render", str(path))
    assert result.returncode == 1 and result.stdout.startswith(f"{path}:source.type: source type 'ISO' was removed")


@pytest.fixture(scope="module")
def schema() -> dict:
    result = run("schema")
    assert result.returncode == 0
    return json.loads(result.stdout)


def test_schema_is_a_json_schema_that_checks_templates(schema, body):
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    validator = validator_class(schema)
    body["goldsmith"] = {"backend": "azure", "schedule": "@daily"}
    body["properties"]["customize"] = [{"type": "Shell", "name": "x", "inline": ["true"]}]
    assert list(validator.iter_errors(body)) == []
    body["properties"]["distribute"][0]["aritfactTags"] = {}
    errors = list(validator.iter_errors(body))
    assert errors and all("aritfactTags" in e.message for e in errors)


def test_schema_accepts_the_spec_example(schema):
    example = Path(__file__).resolve().parent / "aib/spec/examples/CreateImageTemplateLinux.json"
    body = json.loads(example.read_text())["parameters"]["parameters"]
    jsonschema.validate(body, schema)


@pytest.mark.parametrize(("args", "message"), [
    (["validate", "--set", "novalue", "t.json"], "goldsmith: --set takes NAME=VALUE, got 'novalue'\n"),
    (["render", "--set", "=x", "t.json"], "goldsmith: --set takes NAME=VALUE, got '=x'\n"),
    (["validate", "--parameters", "missing.json", "t.json"], "goldsmith: missing.json: no such file\n"),
    (["validate", "--parameters", "t.json", "--parameters", "bad.json", "t.json"],
     "goldsmith: bad.json:1:2: invalid JSON: Expecting property name enclosed in double quotes\n"),
])
def test_usage_errors_exit_2(write, body, tmp_path, args, message):
    write(body)
    write("{,}", "bad.json")
    result = run(*args, cwd=tmp_path)
    assert (result.returncode, result.stdout, result.stderr) == (2, "", message)


@pytest.mark.parametrize("args", [[], ["validate"], ["frobnicate"], ["validate", "--bogus", "t.json"]])
def test_bad_command_lines_exit_2_with_usage(args):
    result = run(*args)
    assert result.returncode == 2 and result.stderr.startswith("usage: goldsmith")


BAD_INPUTS = [
    b"\xff\xfe\x00{", b"", b"{" * 50_000, b'{"$schema": 1, "parameters": [], "resources": []}',
    b'{"source": {"type": "Shell"}, "distribute": 5}', b'{"location": "\\udc80", "properties": {"\\ud800": 1}}',
    b'{"$schema": "", "resources": [{"type": "Microsoft.VirtualMachineImages/imageTemplates", '
    b'"location": "[parameters(\'\\ud800\')]"}]}',
    b'{"source": {"type": "PlatformImage"}, "distribute": [{"type": "VHD", "runOutputName": "o", "a\\nb": 1}]}',
]


def test_bad_input_never_prints_a_traceback(tmp_path):
    names = []
    for i, content in enumerate(BAD_INPUTS):
        names.append(f"bad{i}.json")
        (tmp_path / names[-1]).write_bytes(content)
    result = run("validate", *names, cwd=tmp_path)
    assert result.returncode == 1 and result.stderr == ""
    assert sorted({line.split(":")[0] for line in result.stdout.splitlines()}) == names
    for name in names:
        result = run("render", name, cwd=tmp_path)
        assert result.returncode == 1 and result.stderr == ""
        assert all(line.startswith(f"{name}:") for line in result.stdout.splitlines())
