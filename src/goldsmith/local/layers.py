"""Step layers: the build VM's disk after each customize and validate step, kept as a qcow2 overlay in a chain.

A layer's key hashes everything that produced its disk (osbuild's rule): the parent's key, the step's
normalized definition and the checksums of the files it reads. The chain's root key is the source's exact
version and the OS disk size. So a run whose first k steps have the keys of a cached chain starts from layer k,
and a failed run cleared in Airflow resumes from the layer of its last completed step.

Files under ``$GOLDSMITH_LAYERS`` (default ``$GOLDSMITH_CACHE/layers``):
``<key>.qcow2`` (read-only; its backing file is the parent layer's, or the source disk for the first one),
``<key>.json`` (parent, step, run, size, sha256 of the file; its mtime is the last use), ``<key>.refs/<staging>``
(a staging area whose disk chain sits on this layer: never evicted while that staging area exists), ``.lock``.

Invariants: a layer is written only after its step succeeded, to a temporary name renamed into place under the
lock; it is used only when every layer of its chain has its recorded sha256 (a corrupted one is removed, so
the step runs again and writes it anew); eviction removes the least recently used layers beyond
``GOLDSMITH_LAYERS_MAX_GB`` (default 20), never one a live staging area references, and with a layer
its descendants, which can no longer be read.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from goldsmith.settings import goldsmith_cache
from goldsmith.template.plan import BuildPlan, Step

log = logging.getLogger(__name__)

DEFAULT_MAX_GB = 20.0
_CHUNK = 8 * 1024 * 1024


class LayerError(RuntimeError):
    """A layer could not be written or read."""


def layers_dir() -> Path:
    return Path(os.environ.get("GOLDSMITH_LAYERS") or goldsmith_cache() / "layers").expanduser()


def max_bytes() -> int:
    raw = os.environ.get("GOLDSMITH_LAYERS_MAX_GB") or str(DEFAULT_MAX_GB)
    try:
        return int(float(raw) * 1024**3)
    except ValueError:
        raise LayerError(f"GOLDSMITH_LAYERS_MAX_GB={raw!r}: give a size in GiB, like 20") from None


def layered_steps(plan: BuildPlan) -> list[Step]:
    """The steps that each leave a layer, in build order: the customizers, then the in-VM validations."""
    return plan.customize_steps() + plan.validate_steps()


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def root_key(source: dict[str, Any], os_disk_size_gb: int | None) -> str:
    return _digest({"source": [source.get("type"), source.get("id"), source.get("exactVersion")],
                    "osDiskSizeGB": os_disk_size_gb})


def chain_keys(plan: BuildPlan, source: dict[str, Any], os_disk_size_gb: int | None) -> list[str]:
    """The key of the layer after each step of `layered_steps(plan)`."""
    keys, parent = [], root_key(source, os_disk_size_gb)
    for step in layered_steps(plan):
        item = step.item
        uri = getattr(item, "scriptUri", None) or getattr(item, "sourceUri", None)
        parent = _digest({"parent": parent, "group": step.group,
                          "step": item.model_dump(mode="json", by_alias=True, exclude_none=True),
                          "checksums": {uri: plan.checksums.get(uri)} if uri else {}})
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class Layer:
    key: str
    path: Path
    meta: dict[str, Any]


class LayerCache:
    def __init__(self, root: Path | None = None):
        self.root = Path(root) if root else layers_dir()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.qcow2"

    def _meta_path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def meta(self, key: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._meta_path(key).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # --- reading ----------------------------------------------------------------------------------------------

    def get(self, key: str, base: Path) -> Layer | None:
        """The layer `key` if it and every layer under it are intact, down to `base`; touches them (LRU)."""
        chain: list[Layer] = []
        current: str | None = key
        with self._locked():
            while current:
                meta, path = self.meta(current), self.path(current)
                if meta is None or not path.is_file():
                    return None
                if _sha256(path) != meta["sha256"]:
                    log.warning("layer %s (%s, run %s) is corrupted: its sha256 changed; removing it and the "
                                "layers built on it", current[:12], meta.get("task"), meta.get("run"))
                    self._remove_with_descendants(current)
                    return None
                chain.append(Layer(current, path, meta))
                current = meta.get("parent")
            if chain[-1].meta.get("base") != str(base):
                return None  # made over another disk than this build's source
            now = time.time()
            for layer in chain:
                os.utime(self._meta_path(layer.key), (now, now))
        return chain[0]

    def longest(self, keys: list[str], base: Path, *, run_key: str | None = None) -> tuple[int, Layer | None]:
        """How many leading steps a cached chain covers, and its last layer. With `run_key`, only layers that
        run wrote count (a resume of one run, where reuse across runs is off)."""
        for k in range(len(keys), 0, -1):
            meta = self.meta(keys[k - 1])
            if meta is None or (run_key and meta.get("run") != run_key):
                continue
            layer = self.get(keys[k - 1], base)
            if layer:
                return k, layer
        return 0, None

    # --- writing ----------------------------------------------------------------------------------------------

    def store(self, key: str, frozen: Path, *, parent: str | None, base: Path, info: dict[str, Any]) -> Layer | None:
        """Copies `frozen` (a qcow2 overlay no process writes any more) in as layer `key` over `parent`'s layer
        (or over `base`). Returns None when the parent is not cached (evicted meanwhile): nothing to chain to."""
        backing = self.path(parent) if parent else Path(base)
        with self._locked():
            if self.meta(key) and self.path(key).is_file():
                return Layer(key, self.path(key), self.meta(key))  # another run wrote the same layer
            if parent and not (self.meta(parent) and backing.is_file()):
                return None
            tmp = self.root / f".{key}.{os.getpid()}.tmp"
            try:
                shutil.copyfile(frozen, tmp)
                _qemu_img("rebase", "-u", "-F", "qcow2", "-b", str(backing), str(tmp))
                os.chmod(tmp, 0o444)
                meta = {"key": key, "parent": parent, "base": str(base) if not parent else self._base_of(parent),
                        "sha256": _sha256(tmp), "size": tmp.stat().st_size, "created": time.time(), **info}
                tmp.rename(self.path(key))
                _write_json(self._meta_path(key), meta)
            finally:
                tmp.unlink(missing_ok=True)
            self._evict(max_bytes())
        return Layer(key, self.path(key), meta)

    def _base_of(self, key: str) -> str | None:
        meta = self.meta(key)
        return meta.get("base") if meta else None

    # --- references from staging areas ------------------------------------------------------------------------

    def ref(self, key: str, staging: Path) -> None:
        """Marks the chain under `key` as in use by `staging` until `unref(staging)`."""
        with self._locked():
            current: str | None = key
            while current:
                refs = self.root / f"{current}.refs"
                refs.mkdir(exist_ok=True)
                (refs / staging.name).write_text(str(staging))
                current = (self.meta(current) or {}).get("parent")

    def unref(self, staging: Path) -> None:
        if not self.root.is_dir():
            return
        with self._locked():
            for refs in self.root.glob("*.refs"):
                (refs / staging.name).unlink(missing_ok=True)

    def _in_use(self, key: str) -> bool:
        refs = self.root / f"{key}.refs"
        return refs.is_dir() and any(Path(r.read_text()).is_dir() for r in refs.iterdir())

    # --- listing and eviction ---------------------------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """Every layer's metadata with its last use and whether a staging area uses it, least recent first."""
        out = []
        for meta_path in self.root.glob("*.json"):
            meta = self.meta(meta_path.stem)
            if meta:
                out.append({**meta, "lastUsed": meta_path.stat().st_mtime, "inUse": self._in_use(meta["key"])})
        return sorted(out, key=lambda e: e["lastUsed"])

    def prune(self, limit: int | None = None) -> list[str]:
        """Evicts least recently used layers until they fit in `limit` bytes (default: the size setting; 0
        removes every layer not in use). Returns the removed keys."""
        with self._locked():
            return self._evict(max_bytes() if limit is None else limit)

    def _evict(self, limit: int) -> list[str]:
        removed: list[str] = []
        entries = self.entries()
        total = sum(e["size"] for e in entries)
        for entry in entries:
            if total <= limit:
                break
            key = entry["key"]
            if key in removed or self._in_use(key):  # ref() marks a whole chain: ancestors of a used layer too
                continue
            for gone in self._remove_with_descendants(key):
                removed.append(gone)
                total -= next((e["size"] for e in entries if e["key"] == gone), 0)
        if removed:
            log.info("layer cache over %.1f GiB: evicted %d layer(s)", limit / 1024**3, len(removed))
        return removed

    def _descendants(self, key: str) -> list[str]:
        children = [e["key"] for e in (self.meta(p.stem) for p in self.root.glob("*.json")) if e and e.get("parent") == key]
        return children + [d for c in children for d in self._descendants(c)]

    def _remove_with_descendants(self, key: str) -> list[str]:
        gone = [key, *self._descendants(key)]
        for k in gone:
            self._meta_path(k).unlink(missing_ok=True)
            path = self.path(k)
            if path.exists():
                path.unlink()
            shutil.rmtree(self.root / f"{k}.refs", ignore_errors=True)
        return gone


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    tmp.rename(path)


def _qemu_img(*args: str) -> None:
    done = subprocess.run(["qemu-img", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise LayerError(f"qemu-img {' '.join(args)} failed: {done.stderr.strip()}")


class StagingChain:
    """A build's own disk chain, in `<staging>/layers.json`: which layered step the live disk has reached
    (`at`), whether a step has run on it since the last freeze (`dirty`), the frozen file holding the disk after
    each completed step (`frozen`, by position), and the steps a cached chain provided (`reused`)."""

    FILE = "layers.json"

    def __init__(self, staging: Path):
        self.file = Path(staging) / self.FILE
        try:
            self.state: dict[str, Any] = json.loads(self.file.read_text())
        except FileNotFoundError:
            self.state = {"at": 0, "dirty": False, "frozen": {}, "reused": []}

    def save(self) -> None:
        _write_json(self.file, self.state)

    @property
    def at(self) -> int:
        return self.state["at"]

    def frozen(self, position: int) -> Path | None:
        """The file holding the disk after step `position` (-1: before any step), if this build has it."""
        path = self.state["frozen"].get(str(position))
        return Path(path) if path else None

    def started(self, at: int, frozen_below: Path | None = None, reused: list[dict[str, Any]] | None = None) -> None:
        """The live disk is a fresh overlay holding the state after `at` steps (over `frozen_below`)."""
        self.state.update(at=at, dirty=False)
        if frozen_below:
            self.state["frozen"][str(at - 1)] = str(frozen_below)
        if reused is not None:
            self.state["reused"] = reused
        self.save()

    def mark_dirty(self) -> None:
        self.state["dirty"] = True
        self.save()

    def frozen_after(self, position: int, path: Path) -> None:
        self.state["frozen"][str(position)] = str(path)
        self.state.update(at=position + 1, dirty=False)
        self.save()
