"""P6: distribution throughput: a 4 GiB image converted to a fixed VHD and to qcow2 (plain, zstd-compressed
as Goldsmith's capture writes it, zlib-compressed as Packer's disk_compression does), against a plain copy of
the same bytes on the same disk; and both distribution formats made at once, as a build's capture does.

The source is a fully allocated 4 GiB qcow2: a quarter random bytes (like compressed packages), the rest
copies of the host's /usr/lib files (like an installed system). It stays in the page cache (the host has
the memory), so every figure is the same read plus its own work and writes; each includes the fsync of
its output. Every output is removed before the next one is made.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import _report
from goldsmith.local import disk

IMAGE_GIB = 4
CHUNK = 1 << 20


def _make_source(path: Path) -> None:
    """A raw 4 GiB of mixed data, converted to an uncompressed qcow2 with every cluster allocated."""
    raw = path.with_suffix(".raw")
    corpus = b"".join(p.read_bytes() for p in sorted(Path("/usr/lib/x86_64-linux-gnu").glob("*.so*"))[:400]
                      if p.is_file() and not p.is_symlink())[: 64 * CHUNK]
    with raw.open("wb") as f:
        for i in range(IMAGE_GIB * 1024):
            if i % 4 == 0:
                f.write(os.urandom(CHUNK))
            else:
                start = (i * 7919 * 4096) % (len(corpus) - CHUNK)
                f.write(corpus[start:start + CHUNK])
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", "-S", "0", raw, path], check=True)
    raw.unlink()


def _command(argv: list[Any], out: Path) -> list[Path]:
    subprocess.run([*argv, out], check=True)
    return [out]


def _timed(make: Callable[[], list[Path]]) -> float:
    start = time.perf_counter()
    outputs = make()
    for out in outputs:
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    seconds = time.perf_counter() - start
    for out in outputs:
        out.unlink()
    return seconds


def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="goldsmith-bench-p6-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        src = work / "source.qcow2"
        _make_source(src)
        data = int(subprocess.run(["du", "-B1", src], capture_output=True, text=True).stdout.split()[0])
        cases: dict[str, Callable[[], list[Path]]] = {
            "copy": lambda: _command(["cp", "--sparse=never", src], work / "copy"),
            "vhd": lambda: [disk.to_fixed_vhd(src, work / "out.vhd")],
            "qcow2": lambda: [disk.to_qcow2(src, work / "out.qcow2", compress=False)],
            "qcow2_zstd": lambda: [disk.to_qcow2(src, work / "out.qcow2")],
            "qcow2_zlib": lambda: _command(["qemu-img", "convert", "-c", "-O", "qcow2", src], work / "zlib.qcow2"),
        }
        _timed(cases["copy"])  # warm-up: the source into the page cache
        seconds = {name: round(_timed(make), 2) for name, make in cases.items()}
    result = {"benchmark": "distribution", "image_gib": IMAGE_GIB, "data_gib": round(data / 2**30, 2),
              "seconds": seconds, **_report.machine()}
    for name, s in seconds.items():
        print(f"  {name:12} {s:6.2f} s  {IMAGE_GIB * 1024 / s:7.0f} MiB/s")
    _report.save(result)
    return result


if __name__ == "__main__":
    main()
