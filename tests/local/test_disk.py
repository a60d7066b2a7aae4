"""qemu-img helpers on small real images: overlays, fixed VHD capture, qcow2 capture, VHD footers."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from goldsmith.local import disk
from goldsmith.local.disk import MIB, DiskError


def make_qcow2(path: Path, size: int, data: bytes = b"") -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)
    if data:
        raw = path.with_suffix(".raw")
        raw.write_bytes(data.ljust(size, b"\0"))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(path)], check=True)
        raw.unlink()
    return path


def read_guest_bytes(path: Path, count: int) -> bytes:
    raw = path.with_name(path.name + ".check.raw")
    subprocess.run(["qemu-img", "convert", "-f", disk.image_format(path), "-O", "raw", str(path), str(raw)],
                   check=True)
    try:
        return raw.read_bytes()[:count]
    finally:
        raw.unlink()


@pytest.mark.parametrize("size", [3 * MIB, 3 * MIB + 512])
def test_fixed_vhd_is_whole_mib_with_a_valid_footer(tmp_path, size):
    src = make_qcow2(tmp_path / "src.qcow2", size, b"goldsmith")
    vhd = disk.to_fixed_vhd(src, tmp_path / "out.vhd")
    footer = disk.read_vhd_footer(vhd)
    expected = -(-size // MIB) * MIB
    assert footer["cookie"] == "conectix"
    assert footer["disk_type"] == 2 and footer["disk_type_name"] == "fixed"
    assert footer["current_size"] == expected and expected % MIB == 0
    assert footer["checksum_ok"]
    # A fixed VHD is the raw disk plus the 512-byte footer.
    assert vhd.stat().st_size == expected + 512
    assert disk.image_format(vhd) == "vpc" and disk.virtual_size(vhd) == expected
    assert read_guest_bytes(vhd, 9) == b"goldsmith"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.vhd", "src.qcow2"]  # no temporaries left


def test_qcow2_capture_from_vhd_and_overlay(tmp_path):
    base = make_qcow2(tmp_path / "base.qcow2", 4 * MIB, b"base data")
    overlay = disk.create_overlay(base, tmp_path / "overlay.qcow2")
    assert disk.virtual_size(overlay) == 4 * MIB
    flat = disk.to_qcow2(overlay, tmp_path / "flat.qcow2")
    info = subprocess.run(["qemu-img", "info", str(flat)], capture_output=True, text=True).stdout
    assert "backing file" not in info and "compression type: zstd" in info
    assert read_guest_bytes(flat, 9) == b"base data"
    # A fixed VHD would be probed as raw (footer and all) if its format were not passed on.
    vhd = disk.to_fixed_vhd(base, tmp_path / "base.vhd")
    again = disk.to_qcow2(vhd, tmp_path / "again.qcow2", compress=False)
    assert disk.virtual_size(again) == 4 * MIB and read_guest_bytes(again, 9) == b"base data"


def test_overlay_grows_but_never_shrinks(tmp_path):
    base = make_qcow2(tmp_path / "base.qcow2", 2 * disk.GIB)
    grown = disk.create_overlay(base, tmp_path / "grown.qcow2", size_gb=3)
    assert disk.virtual_size(grown) == 3 * disk.GIB
    with pytest.raises(DiskError, match="osDiskSizeGB 1 is smaller than the source image"):
        disk.create_overlay(base, tmp_path / "small.qcow2", size_gb=1)


def test_overlay_needs_a_qcow2_backing(tmp_path):
    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\0" * MIB)
    with pytest.raises(DiskError, match="is raw, expected qcow2"):
        disk.create_overlay(raw, tmp_path / "o.qcow2")


def test_footer_of_a_non_vhd_and_missing_files(tmp_path):
    qcow2 = make_qcow2(tmp_path / "a.qcow2", MIB)
    with pytest.raises(DiskError, match="is not a VHD"):
        disk.read_vhd_footer(qcow2)
    with pytest.raises(DiskError, match="does not exist"):
        disk.virtual_size(tmp_path / "missing.qcow2")
    with pytest.raises(DiskError, match="does not exist"):
        disk.to_fixed_vhd(tmp_path / "missing.qcow2", tmp_path / "x.vhd")
    assert not (tmp_path / "x.vhd").exists()


def test_corrupt_footer_checksum_is_reported(tmp_path):
    vhd = disk.to_fixed_vhd(make_qcow2(tmp_path / "a.qcow2", MIB), tmp_path / "a.vhd")
    with vhd.open("r+b") as f:
        f.seek(-512 + 48, 2)  # current size field
        f.write((2 * MIB).to_bytes(8, "big"))
    footer = disk.read_vhd_footer(vhd)
    assert footer["current_size"] == 2 * MIB and not footer["checksum_ok"]
