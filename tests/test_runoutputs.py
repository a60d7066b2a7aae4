"""Run outputs, on real files in a tmp dir."""

from __future__ import annotations

import json

import pytest

from goldsmith import runoutputs
from goldsmith.runoutputs import RunOutputsError, list_outputs, list_runs, record, run_dir_name

VERSION_ID = ("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/ubuntu/"
              "versions/1.0.0")
RUN = "manual__2025-01-01T00:00:00+00:00"


def test_record_then_list_the_latest_run(tmp_path):
    record("ubuntu-golden", RUN, "sig", VERSION_ID, None, "Succeeded", {"templateDigest": "sha256:abc"}, home=tmp_path)
    record("ubuntu-golden", RUN, "vhd", None, "file:///images/x.vhd", "Succeeded", home=tmp_path)

    run_id, outputs = list_outputs("ubuntu-golden", home=tmp_path)
    assert run_id == RUN
    sig, vhd = outputs
    assert sig["name"] == "sig"
    assert sig["type"] == "Microsoft.VirtualMachineImages/imageTemplates/runOutputs"
    assert sig["properties"] == {"artifactId": VERSION_ID, "artifactUri": None, "provisioningState": "Succeeded"}
    assert sig["goldsmith"]["runId"] == RUN and sig["goldsmith"]["templateDigest"] == "sha256:abc"
    assert "recordedTime" in sig["goldsmith"]
    assert vhd["properties"]["artifactUri"] == "file:///images/x.vhd"

    run_dir = tmp_path / "runs" / "ubuntu-golden" / run_dir_name(RUN)
    assert ":" not in run_dir.name and "+" not in run_dir.name
    assert json.loads((run_dir / "outputs" / "sig.json").read_text()) == sig


def test_latest_run_is_the_last_recorded_not_the_last_by_name(tmp_path):
    record("t", "scheduled__2025-02-01", "out", VERSION_ID, None, "Succeeded", home=tmp_path)
    record("t", "manual__2025-01-01", "out", VERSION_ID, None, "Succeeded", home=tmp_path)
    assert list_runs("t", home=tmp_path) == ["scheduled__2025-02-01", "manual__2025-01-01"]
    assert list_outputs("t", home=tmp_path)[0] == "manual__2025-01-01"
    # a later output of an earlier run doesn't make it the latest run
    record("t", "scheduled__2025-02-01", "other", VERSION_ID, None, "Succeeded", home=tmp_path)
    assert list_outputs("t", home=tmp_path)[0] == "manual__2025-01-01"
    run_id, outputs = list_outputs("t", "scheduled__2025-02-01", home=tmp_path)
    assert run_id == "scheduled__2025-02-01" and [o["name"] for o in outputs] == ["other", "out"]


def test_recording_again_replaces_the_output(tmp_path):
    record("t", RUN, "out", None, None, "Running", home=tmp_path)
    record("t", RUN, "out", VERSION_ID, None, "Succeeded", home=tmp_path)
    _, [output] = list_outputs("t", home=tmp_path)
    assert output["properties"]["provisioningState"] == "Succeeded"


def test_run_ids_that_look_alike_stay_apart(tmp_path):
    assert run_dir_name("a:b") != run_dir_name("a_b")
    record("t", "a:b", "out", "one", None, "Succeeded", home=tmp_path)
    record("t", "a_b", "out", "two", None, "Succeeded", home=tmp_path)
    assert list_outputs("t", "a:b", home=tmp_path)[1][0]["properties"]["artifactId"] == "one"
    assert list_outputs("t", "a_b", home=tmp_path)[1][0]["properties"]["artifactId"] == "two"


def test_no_runs_and_unknown_runs(tmp_path):
    assert list_outputs("t", home=tmp_path) == (None, [])
    assert list_runs("t", home=tmp_path) == []
    record("t", RUN, "out", VERSION_ID, None, "Succeeded", home=tmp_path)
    with pytest.raises(RunOutputsError, match=r"no recorded run 'nope'; recorded runs: manual__2025"):
        list_outputs("t", "nope", home=tmp_path)


@pytest.mark.parametrize("template, name", [("..", "out"), ("a/b", "out"), ("t", "../x"), ("t", ""), ("t", "x" * 65)])
def test_bad_names_are_refused(tmp_path, template, name):
    with pytest.raises(RunOutputsError, match=r"must match"):
        record(template, RUN, name, None, None, "Succeeded", home=tmp_path)


def test_home_defaults_to_goldsmith_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GOLDSMITH_HOME", str(tmp_path))
    runoutputs.record("t", RUN, "out", VERSION_ID, None, "Succeeded")
    assert (tmp_path / "runs" / "t" / run_dir_name(RUN) / "outputs" / "out.json").is_file()
