"""The layer cache and layer keys on small qcow2 files (no VM): chains, integrity, references, eviction."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from goldsmith.local import layers
from goldsmith.local.layers import LayerCache
from goldsmith.template.loader import load_template
from goldsmith.template.plan import make_plan

SOURCE = {"type": "PlatformImage", "id": "Debian:debian-12:12", "exactVersion": "0.4.1"}


def qcow2(path: Path, backing: Path | None = None, data: bytes = b"") -> Path:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        args += ["-F", "qcow2", "-b", str(backing)]
    subprocess.run([*args, str(path), "64M"], check=True)
    if data:  # real guest data in the image, so its sha256 differs from an empty one
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {data[0]} 0 64k", str(path)], check=True,
                       capture_output=True)
    return path


def backing_of(path: Path) -> str:
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(path)], check=True,
                                     capture_output=True, text=True).stdout)
    return info.get("backing-filename", "")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> LayerCache:
    monkeypatch.setenv("GOLDSMITH_LAYERS", str(tmp_path / "layers"))
    return LayerCache()


@pytest.fixture
def chain(tmp_path, cache) -> tuple[Path, list[str]]:
    """A base and two cached layers over it, stored from a build's frozen staging files."""
    base = qcow2(tmp_path / "base.qcow2", data=b"\x01")
    staging = tmp_path / "staging"
    staging.mkdir()
    d0 = qcow2(staging / "disk-0.qcow2", base, b"\x02")
    d1 = qcow2(staging / "disk-1.qcow2", d0, b"\x03")
    cache.store("k0", d0, parent=None, base=base, info={"task": "customize.0_a", "run": "dag/r1"})
    cache.store("k1", d1, parent="k0", base=base, info={"task": "customize.1_b", "run": "dag/r1"})
    return base, ["k0", "k1"]


def test_a_stored_layer_chains_to_its_parent_in_the_cache_and_is_read_only(cache, chain) -> None:
    base, _ = chain
    assert backing_of(cache.path("k0")) == str(base) and backing_of(cache.path("k1")) == str(cache.path("k0"))
    assert not cache.path("k1").stat().st_mode & 0o222
    layer = cache.get("k1", base)
    assert layer and layer.meta["parent"] == "k0" and layer.meta["base"] == str(base)
    assert layer.meta["run"] == "dag/r1" and layer.meta["sha256"]
    # The whole chain reads: qemu-img follows it from the top layer down to the base.
    subprocess.run(["qemu-img", "check", "-q", str(cache.path("k1"))], check=True)
    assert cache.longest(["k0", "k1", "k2"], base) == (2, cache.get("k1", base))
    assert cache.longest(["k0", "k1"], base, run_key="dag/other")[0] == 0  # reuse off: another run's layers
    assert cache.get("k1", base.with_name("other-base.qcow2")) is None  # made over another disk


def test_a_corrupted_layer_is_removed_with_the_layers_built_on_it(cache, chain) -> None:
    base, _ = chain
    path = cache.path("k0")
    path.chmod(0o644)
    with path.open("r+b") as f:
        f.seek(path.stat().st_size - 100)
        f.write(b"\x00garbage")
    assert cache.get("k1", base) is None
    assert not path.exists() and not cache.path("k1").exists() and cache.meta("k1") is None
    assert cache.longest(["k0", "k1"], base) == (0, None)


def test_a_layer_is_not_chained_to_a_parent_that_is_gone(cache, chain, tmp_path) -> None:
    base, _ = chain
    orphan = qcow2(tmp_path / "staging" / "disk-2.qcow2", tmp_path / "staging" / "disk-1.qcow2")
    assert cache.store("k9", orphan, parent="missing", base=base, info={}) is None
    assert cache.meta("k9") is None and not list(cache.root.glob(".*.tmp"))


def test_eviction_takes_the_least_recently_used_and_never_a_layer_in_use(cache, chain, tmp_path) -> None:
    base, _ = chain
    staging = tmp_path / "IT_rg_t_guid"
    staging.mkdir()
    past = time.time() - 3600
    os.utime(cache.root / "k0.json", (past, past))  # k0 is the least recently used...
    cache.ref("k1", staging)  # ...but a live staging area builds on k1, and so on k0
    assert cache.prune(0) == []
    assert [e["inUse"] for e in cache.entries()] == [True, True]
    cache.unref(staging)
    assert sorted(cache.prune(0)) == ["k0", "k1"]  # k1 goes with its parent: it could not be read any more
    assert cache.entries() == [] and not list(cache.root.glob("k*"))


def test_a_reference_from_a_removed_staging_area_does_not_pin_a_layer(cache, chain, tmp_path) -> None:
    staging = tmp_path / "IT_gone"
    staging.mkdir()
    cache.ref("k1", staging)
    staging.rmdir()  # a staging area removed without cleanup_staging (a crashed worker)
    assert sorted(cache.prune(0)) == ["k0", "k1"]


def test_the_size_setting_bounds_the_cache_and_bad_values_say_how_to_fix_them(cache, chain, monkeypatch) -> None:
    monkeypatch.setenv("GOLDSMITH_LAYERS_MAX_GB", "1")
    assert cache.prune() == []
    monkeypatch.setenv("GOLDSMITH_LAYERS_MAX_GB", "lots")
    with pytest.raises(layers.LayerError, match="GOLDSMITH_LAYERS_MAX_GB='lots': give a size in GiB"):
        cache.prune()


def test_storing_a_layer_that_exists_keeps_the_first(cache, chain, tmp_path) -> None:
    base, _ = chain
    first = cache.meta("k0")
    again = cache.store("k0", tmp_path / "staging" / "disk-0.qcow2", parent=None, base=base, info={"run": "dag/r2"})
    assert again.meta == first and cache.meta("k0")["run"] == "dag/r1"


def _plan(tmp_path: Path, customize: list[dict]):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"location": "westeurope", "properties": {
        "source": {"type": "PlatformImage", "publisher": "Debian", "offer": "debian-12", "sku": "12",
                   "version": "latest"},
        "customize": customize, "distribute": [{"type": "VHD", "runOutputName": "vhd"}]}}))
    return make_plan(load_template(path))


def test_a_key_covers_the_source_the_steps_so_far_and_the_files_they_read(tmp_path) -> None:
    script = tmp_path / "s.sh"
    script.write_text("echo v1\n")
    steps = [{"type": "Shell", "name": "a", "inline": ["true"]},
             {"type": "Shell", "name": "b", "scriptUri": script.as_uri()},
             {"type": "Shell", "name": "c", "inline": ["echo c"]}]
    keys = layers.chain_keys(_plan(tmp_path, steps), SOURCE, None)
    assert len(set(keys)) == 3 and keys == layers.chain_keys(_plan(tmp_path, steps), SOURCE, None)

    edited_last = layers.chain_keys(_plan(tmp_path, steps[:2] + [{**steps[2], "inline": ["echo d"]}]), SOURCE, None)
    assert edited_last[:2] == keys[:2] and edited_last[2] != keys[2]

    script.write_text("echo v2\n")  # the script's checksum invalidates its step and every later one
    changed = layers.chain_keys(_plan(tmp_path, steps), SOURCE, None)
    assert changed[0] == keys[0] and not set(changed[1:]) & set(keys)

    newer_source = layers.chain_keys(_plan(tmp_path, steps), {**SOURCE, "exactVersion": "0.4.2"}, None)
    bigger_disk = layers.chain_keys(_plan(tmp_path, steps), SOURCE, 40)
    assert not set(newer_source) & set(changed) and not set(bigger_disk) & set(changed)


def test_goldsmith_cache_list_and_prune(cache, chain, capsys) -> None:
    from goldsmith.cli import main

    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "customize.1_b  run dag/r1" in out and out.strip().endswith(f"2 layer(s), 0.00 GiB in {cache.root}")
    assert main(["cache", "list", "--json"]) == 0
    assert [e["key"] for e in json.loads(capsys.readouterr().out)] == ["k0", "k1"]
    assert main(["cache", "prune", "--max-gb", "0"]) == 0
    assert capsys.readouterr().out == "removed 2 layer(s)\n" and cache.entries() == []


def test_a_saved_state_from_another_qemu_is_not_used_and_says_why(tmp_path, monkeypatch) -> None:
    from goldsmith.local import savedstate

    state = savedstate.SavedState(tmp_path)
    (tmp_path / "state.json").write_text(json.dumps({"qemu": "QEMU emulator version 6.0.0"}))
    assert savedstate.usable(state) == f"saved by QEMU emulator version 6.0.0, this host runs {savedstate.qemu_version()}"
    (tmp_path / "state.json").write_text(json.dumps({"qemu": savedstate.qemu_version()}))
    assert savedstate.usable(state) is None
    assert not savedstate.enabled()  # off unless asked for
    monkeypatch.setenv("GOLDSMITH_SAVED_STATE", "on")
    assert savedstate.enabled()
