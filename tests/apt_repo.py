"""A small apt repository served over HTTP on loopback, for SBOM and `onUpdates` tests.

Packages are real .deb files made with dpkg-deb; the index is made with dpkg-scanpackages under
`dists/<suite>/main/binary-amd64/` with an unsigned Release file (sources use `[trusted=yes]`). A build VM of
the local backend reaches it at 10.0.2.2:<port> (QEMU's user network maps that to this host's loopback).
Publishing a newer version regenerates the index, as an archive update would.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from email.utils import formatdate
from functools import partial
from pathlib import Path

import pytest

COMPONENT = "main"
ARCH = "amd64"


@dataclass
class AptRepo:
    root: Path
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def source_line(self, suite: str, host: str = "127.0.0.1") -> str:
        return f"deb [trusted=yes] http://{host}:{self.port} {suite} {COMPONENT}"

    def publish(self, name: str, version: str, suite: str, description: str = "a Goldsmith test package") -> Path:
        """Build `name`_`version` (arch all, a file in /usr/share/doc/NAME) into `suite` and reindex it."""
        pool = self.root / "pool" / suite
        build = self.root / "build" / f"{name}_{version}"
        (build / "DEBIAN").mkdir(parents=True, exist_ok=True)
        (build / "usr/share/doc" / name).mkdir(parents=True, exist_ok=True)
        (build / "usr/share/doc" / name / "VERSION").write_text(version + "\n")
        (build / "DEBIAN/control").write_text(
            f"Package: {name}\nVersion: {version}\nArchitecture: all\nMaintainer: Goldsmith Tests <tests@goldsmith.invalid>\n"
            f"Priority: optional\nSection: misc\nDescription: {description}\n")
        pool.mkdir(parents=True, exist_ok=True)
        deb = pool / f"{name}_{version}_all.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "-Zgzip", "--build", str(build), str(deb)], check=True,
                       capture_output=True)
        self._index(suite)
        return deb

    def _index(self, suite: str) -> None:
        index = subprocess.run(["dpkg-scanpackages", "--multiversion", f"pool/{suite}", "/dev/null"], cwd=self.root,
                               check=True, capture_output=True).stdout
        binary = self.root / "dists" / suite / COMPONENT / f"binary-{ARCH}"
        binary.mkdir(parents=True, exist_ok=True)
        (binary / "Packages").write_bytes(index)
        (binary / "Packages.gz").write_bytes(gzip.compress(index, mtime=0))
        files = [p for p in sorted(binary.iterdir())]
        lines = [f" {hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_size} "
                 f"{p.relative_to(binary.parent.parent)}" for p in files]
        (self.root / "dists" / suite / "Release").write_text(
            f"Origin: goldsmith-tests\nLabel: goldsmith-tests\nSuite: {suite}\nCodename: {suite}\n"
            f"Date: {formatdate(usegmt=True)}\nArchitectures: {ARCH}\nComponents: {COMPONENT}\nSHA256:\n"
            + "\n".join(lines) + "\n")


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@contextmanager
def serving_apt_repo(root: Path) -> Iterator[AptRepo]:
    """The repository under `root`, served on 127.0.0.1 until the block ends."""
    if subprocess.run(["which", "dpkg-scanpackages"], capture_output=True).returncode != 0:
        pytest.skip("dpkg-scanpackages missing: apt-get install dpkg-dev")
    root.mkdir(parents=True, exist_ok=True)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, name="apt-repo", daemon=True)
    thread.start()
    try:
        yield AptRepo(root, server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
