"""The local backend: AIB's build steps with a QEMU VM on this host.

The staging area is a directory `$GOLDSMITH_HOME/staging/IT_<rg>_<template>_<guid>/` holding everything a
build makes: the ephemeral SSH key, the copy-on-write overlay over the source disk, the cloud-init seed, the
VM's pid/port (vm.json), its serial console log, `ready` (the VM boot that has answered SSH with cloud-init
done, so later steps connect at once) and the captured image. Every step finds its inputs there by name, so
steps run in separate processes and a retried step adopts what an earlier try made.

The VM's disk is a chain of overlays `disk-<n>.qcow2`: after each customize and validate step the live one is
frozen and copied into the layer cache (goldsmith.local.layers, `layers.json` here). So provision starts from
the longest cached chain of the template's first steps, a step whose earlier try ran restarts from the disk
before it, and a cleared step whose staging area was removed boots from the layer of the step before it.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator


from goldsmith import affinity, buildsbom, confine, customizers, runoutputs, sbom, updates
from goldsmith.core import Build, BuildError, Reused
from goldsmith.communicator import CommunicatorError, SSHCommunicator, create_build_key
from goldsmith.local import baseimage, catalog, disk, layers, qemu, savedstate, vmsizes
from goldsmith.local.gallery import GalleryError, LocalGallery
from goldsmith.local.sources import LocalSources
from goldsmith.provenance import Provenance
from goldsmith.settings import goldsmith_home
from goldsmith.template.plan import Step

BUILD_USER = "goldsmith"
MARKER = ".goldsmith-staging"
SSH_READY_TIMEOUT = 1200  # seconds: boot to SSH under emulation takes 60-90 s idle, over 10 min on a loaded host
READY = "ready"  # holds the started_at of the QEMU whose guest answered SSH with cloud-init done
QUICK_CONNECT_TIMEOUT = 30  # seconds for a guest known to be up to accept a connection


class LocalBackend:
    def __init__(self, build: Build):
        self.build = build
        self.log = build.log
        self.staging = goldsmith_home() / "staging" / build.staging_name
        self.gallery = LocalGallery(goldsmith_home() / "gallery")

    # --- plan --------------------------------------------------------------------------------------------------

    def resolve_source(self) -> dict[str, Any]:
        return LocalSources(goldsmith_home()).resolve(self.build.plan.template.properties.source)

    # --- staging and VM ----------------------------------------------------------------------------------------

    def prepare_staging(self) -> dict[str, Any]:
        marker = self.staging / MARKER
        if marker.exists():
            self.log.info("adopting staging area %s from an earlier try", self.staging)
        else:
            self.staging.mkdir(parents=True, exist_ok=True)
            marker.write_text(json.dumps({"runKey": self.build.run_key, "created": _now(), "host": affinity.this_host()}))
            self.log.info("created staging area %s on host %s", self.staging, affinity.this_host())
        self._ensure_key()
        # Later steps compare the host with theirs (affinity.wrong_host): the VM never leaves this host.
        return {"staging": str(self.staging), "host": json.loads(marker.read_text()).get("host", affinity.this_host())}

    def _ensure_key(self) -> Path:
        """An ed25519 key made for this build only; it reaches the VM through the cloud-init seed."""
        key = self.staging / "id_ed25519"
        create_build_key(key)
        return key

    def _require_staging(self) -> None:
        if not (self.staging / MARKER).exists():
            raise BuildError(f"staging area {self.staging} is missing: prepare_staging must run first")

    def provision(self, source: dict[str, Any]) -> dict[str, Any]:
        self._require_staging()
        vm = qemu.VMState.load(self.staging)
        chain = layers.StagingChain(self.staging)
        if vm and vm.is_running():
            self.log.info("adopting the running build VM (pid %s, ssh port %s)", vm.pid, vm.port)
        elif vm:
            vm = vm.relaunch()
        else:
            reused, backing = self._cached_start(source)
            vm = self._boot(backing)
            chain.started(len(reused), backing if reused else None, reused)
        self._ready(vm)
        return {"pid": vm.pid, "port": vm.port, "accel": vm.accel, "reusedSteps": len(chain.state["reused"])}

    def _boot(self, backing: Path) -> qemu.VMState:
        """A new build VM on a fresh overlay over `backing` (the source disk or a layer): from the source's
        saved running state where one can be used (seconds), else a cold boot."""
        try:
            vcpus, memory_mib = vmsizes.vm_size(self._vm_size())
        except vmsizes.VmSizeError as e:
            raise BuildError(str(e)) from None
        public_key = (self.staging / "id_ed25519.pub").read_text().strip()
        launch = functools.partial(qemu.launch, self.staging, vcpus=vcpus, memory_mib=memory_mib, user=BUILD_USER,
                                   hostname=self.build.plan.name, key_path=self.staging / "id_ed25519")
        if savedstate.enabled() and backing == self._source_disk(self._source) and not self._os_disk_size_gb():
            vm = None
            try:
                state = savedstate.ensure(backing, vcpus, memory_mib, qemu.choose_accel()[0])
                why = savedstate.usable(state)
                if why is None:
                    vm = launch(disk.create_overlay(state.disk, self._next_disk()), ssh_public_key=public_key,
                                incoming=state.stream)
                    with SSHCommunicator("127.0.0.1", vm.port, BUILD_USER, state.key) as comm:
                        comm.wait_until_ready(QUICK_CONNECT_TIMEOUT, cloud_init=False)
                        savedstate.hand_over(comm, build_key=public_key, hostname=vm.hostname)
                    self.log.info("build VM %s started from the saved state of %s", self._vm_size(), backing)
                    return vm
            except (savedstate.SavedStateError, qemu.VMError, CommunicatorError, disk.DiskError) as e:
                why = str(e)
                if vm and vm.is_running():
                    vm.stop(timeout=10)
            self.log.warning("cold boot: the saved state can't be used (%s)", why)
        overlay = disk.create_overlay(backing, self._next_disk(), self._os_disk_size_gb())
        self.log.info("starting build VM %s: %d vCPU, %d MiB, from %s", self._vm_size(), vcpus, memory_mib, backing)
        return launch(overlay, ssh_public_key=public_key)

    def _next_disk(self) -> Path:
        return self.staging / f"disk-{len(list(self.staging.glob('disk-*.qcow2')))}.qcow2"

    def _ready(self, vm: qemu.VMState) -> None:
        started = time.monotonic()
        with self._connect(vm) as comm:
            # cloud-init has done its work: the base image's GRUB skips it at the build VM's later boots.
            # sync: the overlay on the host holds what the guest wrote even if this worker is killed next.
            _run_root(comm, f"touch {baseimage.BUILD_VM_MARKER} && sync")
        self.log.info("build VM ready: ssh on 127.0.0.1:%s after %.0f s (%s)", vm.port, time.monotonic() - started,
                      vm.accel)

    def _source_disk(self, source: dict[str, Any]) -> Path:
        if source.get("path"):
            return Path(source["path"])
        s = self.build.plan.template.properties.source
        entry = catalog.resolve(s.publisher, s.offer, s.sku, source["exactVersion"])
        self.log.info("base image for %s (built once, then cached)", source["id"])
        return baseimage.ensure_base_image(entry)

    def _vm_size(self) -> str:
        profile = self.build.plan.template.properties.vmProfile
        return (profile.vmSize if profile else "") or "Standard_D1_v2"

    def _os_disk_size_gb(self) -> int | None:
        profile = self.build.plan.template.properties.vmProfile
        return (profile.osDiskSizeGB if profile else 0) or None

    # --- layers -----------------------------------------------------------------------------------------------

    @functools.cached_property
    def _source(self) -> dict[str, Any]:
        """The plan's resolved source (the operators pass it; a caller of the backend alone may not)."""
        return self.build.source or self.resolve_source()

    def _keys(self) -> list[str]:
        return layers.chain_keys(self.build.plan, self._source, self._os_disk_size_gb())

    def _reuse_across_runs(self) -> bool:
        """Patch rebuilds stay honest: the same step definitions give another disk a week later."""
        options = self.build.plan.options
        return options.reuseLayers and options.rebuild == "onChange" and not self.build.params.get("forceRebuild")

    def _cached_start(self, source: dict[str, Any]) -> tuple[list[dict[str, Any]], Path]:
        """The steps a cached chain already did (task, key, run) and the disk to start from."""
        base, keys = self._source_disk(source), layers.chain_keys(self.build.plan, source, self._os_disk_size_gb())
        cache = layers.LayerCache()
        k, layer = cache.longest(keys, base, run_key=None if self._reuse_across_runs() else self.build.run_key)
        if not layer:
            return [], base
        cache.ref(layer.key, self.staging)
        steps = layers.layered_steps(self.build.plan)[:k]
        reused = [{"task": s.task_id, "key": key, "run": (cache.meta(key) or {}).get("run")}
                  for s, key in zip(steps, keys)]
        self.log.info("starting from the cached layer of %s (run %s): %d of %d steps reused", steps[-1].task_id,
                      reused[-1]["run"], k, len(keys))
        return reused, layer.path

    def _step_session(self, step: Step) -> tuple[qemu.VMState, SSHCommunicator, int]:
        """The VM with its disk as the step before `step` left it, booted from a layer if need be."""
        if not (self.staging / MARKER).exists():  # cleared without its setup ("clear failed"): resume all the same
            self.log.warning("no staging area (cleanup_staging removed it): making it again to resume")
            self.prepare_staging()
        chain = layers.StagingChain(self.staging)
        position = layers.layered_steps(self.build.plan).index(step)
        if position < len(chain.state["reused"]):
            r = chain.state["reused"][position]
            raise Reused(f"{step.task_id}: already in the cached layer {r['key'][:16]} made by run {r['run']}")
        vm = qemu.VMState.load(self.staging)
        if vm is None or (chain.state["dirty"] and chain.at == position):
            if vm:  # an earlier try of this step changed the disk: start again from the disk before it
                self.log.warning("an earlier try of %s ran on the build VM: restarting it from the disk before",
                                 step.task_id)
                vm.stop(timeout=60)
            backing = self._disk_before(position, chain)
            self._ready(self._boot(backing))
            chain.started(position, backing if position else None)
        chain.mark_dirty()
        vm, comm = self._session()
        return vm, comm, position

    def _disk_before(self, position: int, chain: layers.StagingChain) -> Path:
        """The frozen disk after step `position - 1`: this build's own, or the layer cache's (a resume after
        cleanup_staging removed the staging area)."""
        if position == 0:
            return self._source_disk(self._source)
        if chain.frozen(position - 1):
            return chain.frozen(position - 1)
        cache, key = layers.LayerCache(), self._keys()[position - 1]
        layer = cache.get(key, self._source_disk(self._source))
        previous = layers.layered_steps(self.build.plan)[position - 1].task_id
        if layer is None or (not self._reuse_across_runs() and layer.meta.get("run") != self.build.run_key):
            raise BuildError(f"can't resume: the layer of {previous} ({key[:16]}) is not in the layer cache "
                             f"{cache.root} (evicted, or never written): clear the run from provision instead")
        cache.ref(key, self.staging)
        self.log.info("resuming from the cached layer of %s (run %s)", previous, layer.meta.get("run"))
        return layer.path

    def _freeze(self, step: Step, position: int) -> None:
        """Makes the disk after `step` a layer: frozen in the staging area, copied into the layer cache."""
        chain = layers.StagingChain(self.staging)
        if chain.at != position:  # a step re-run after later ones: its disk is not the step's alone
            return
        vm, comm = self._session()
        authorized = f"/home/{BUILD_USER}/.ssh/authorized_keys"
        with comm:
            # A VM started from the layer must run cloud-init (its own key and host keys) and accept no key of
            # this build: the layer gets neither the marker nor the key. /run is a tmpfs, not in the layer.
            _run_root(comm, f"sh -c 'cp {authorized} /run/goldsmith-keys && : > {authorized} && "
                            f"rm -f {baseimage.BUILD_VM_MARKER} && sync'")
            frozen = Path(vm.disk)
            try:
                vm.snapshot_disk(self._next_disk())
            finally:
                _run_root(comm, f"sh -c 'cat /run/goldsmith-keys > {authorized} && touch {baseimage.BUILD_VM_MARKER}'")
        chain.frozen_after(position, frozen)
        keys = self._keys()
        try:
            layer = layers.LayerCache().store(
                keys[position], frozen, parent=keys[position - 1] if position else None,
                base=self._source_disk(self._source),
                info={"task": step.task_id, "run": self.build.run_key, "template": self.build.plan.name})
        except (layers.LayerError, OSError) as e:  # the build goes on; only a later reuse is lost
            self.log.warning("could not cache the layer of %s: %s", step.task_id, e)
            return
        if layer:
            self.log.info("layer of %s: %s (%.0f MiB)", step.task_id, layer.key[:16], layer.meta["size"] / 2**20)

    def _session(self) -> tuple[qemu.VMState, SSHCommunicator]:
        """The build VM, booted if it is down (a customizer rebooted it), and an SSH session to it."""
        self._require_staging()
        vm = qemu.VMState.load(self.staging)
        if vm is None:
            raise BuildError("no build VM in the staging area: provision must run first")
        if not vm.is_running():
            self.log.warning("the build VM is not running (it rebooted or stopped): starting it again")
            vm = vm.relaunch()
        try:
            return vm, self._connect(vm)
        except RuntimeError:
            if vm.is_running():
                raise
            # It went down while we waited: a reboot still in flight from the previous step.
            self.log.warning("the build VM went down (a reboot in progress): starting it again")
            vm = vm.relaunch()
            return vm, self._connect(vm)

    def _connect(self, vm: qemu.VMState) -> SSHCommunicator:
        comm = SSHCommunicator("127.0.0.1", vm.port, BUILD_USER, self.staging / "id_ed25519")
        ready = self.staging / READY
        if ready.exists() and ready.read_text() == str(vm.started_at):
            # An earlier step saw this QEMU's guest answer with cloud-init done: skip the banner probe and the
            # cloud-init check (seconds a step under emulation). If the guest went down since, take the long way.
            with contextlib.suppress(CommunicatorError):
                comm.wait_until_ready(QUICK_CONNECT_TIMEOUT, cloud_init=False)
                return comm
        try:
            vm.wait_for_ssh(SSH_READY_TIMEOUT)
            comm.wait_until_ready(SSH_READY_TIMEOUT)
        except (CommunicatorError, qemu.VMError, TimeoutError) as e:
            comm.close()
            raise RuntimeError(f"build VM did not answer on SSH: {e}; console log: {self.staging / 'console.log'}") from e
        ready.write_text(str(vm.started_at))
        return comm

    def _on_line(self, line: str) -> None:
        self.log.info("%s", line)

    # --- customize and validate --------------------------------------------------------------------------------

    def customize(self, step: Step) -> dict[str, Any]:
        c = step.item
        vm, comm, position = self._step_session(step)
        try:
            with comm:
                rebooting = customizers.run_linux_customizer(comm, c, name=step.name, on_line=self._on_line,
                                                             secrets=self.build.secrets)
                # The sync also meets a reboot that `going_down` asked about too early (`systemctl reboot` is
                # asynchronous): its connection drops, and the reboot is waited out like any other.
                if rebooting or _sync_unless_going_down(comm):
                    self._wait_out_reboot(vm)  # a clean reboot has flushed the guest's writes
        except customizers.CustomizerError as e:  # downloads were already retried inside fetch()
            raise BuildError(f"{step.task_id}: {e}") from None
        self._freeze(step, position)
        return {"step": step.task_id}

    def _wait_out_reboot(self, vm: qemu.VMState) -> None:
        """QEMU runs with -no-reboot (an in-place reboot under TCG costs ~250 s), so a guest reboot ends the
        process and a fresh QEMU boots the same disk (~75 s)."""
        self.log.info("the customizer rebooted the VM: waiting for it to come back")
        if not vm.wait_exit(timeout=120):
            self.log.info("the VM is still running: it dropped the connection without rebooting")
            return
        with self._connect(vm.relaunch()):
            pass

    def validate(self, step: Step) -> dict[str, Any]:
        v = step.item
        _, comm, position = self._step_session(step)
        try:
            with comm:
                customizers.run_linux_validator(comm, v, name=step.name, on_line=self._on_line,
                                                secrets=self.build.secrets)
        except customizers.CustomizerError as e:
            raise BuildError(f"{step.task_id}: validation failed: {e}") from None
        self._freeze(step, position)
        return {"step": step.task_id, "passed": True}

    # --- generalize, capture, distribute -----------------------------------------------------------------------

    def generalize(self) -> dict[str, Any]:
        done = self.staging / "generalized"
        vm = qemu.VMState.load(self.staging)
        if done.exists() and not (vm and vm.is_running()):
            self.log.info("already generalized and stopped by an earlier try")
            return {"generalized": True}
        vm, comm = self._session()
        with comm:
            try:
                # The packages as the image will have them, before deprovisioning.
                buildsbom.record(self.build, lambda: sbom.collect_linux(buildsbom.ssh_runner(comm)),
                                 updates.LOCAL_GUEST_ALIASES)
                _run_root(comm, f"rm -f {baseimage.BUILD_VM_MARKER}")  # the image boots with cloud-init
                customizers.deprovision(comm, on_line=self._on_line)
            except customizers.CustomizerError as e:
                raise BuildError(f"generalize: {e}") from None
        done.write_text(_now())
        vm.stop(timeout=120)
        self.log.info("VM deprovisioned and powered off")
        return {"generalized": True}

    def capture(self) -> dict[str, Any]:
        image = self.staging / "image.qcow2"
        if not image.exists():
            if not (self.staging / "generalized").exists():
                raise BuildError("capture: the VM was not generalized")
            tmp = image.with_suffix(".tmp")
            # Flattens the overlay, compressed (zstd on every core: seconds, and a third of the size).
            disk.to_qcow2(Path(qemu.VMState.load(self.staging).disk), tmp)
            tmp.rename(image)
        return {"image": str(image), "virtualSize": disk.virtual_size(image)}

    def distribute(self, step: Step, source: dict[str, Any]) -> dict[str, Any]:
        d, plan = step.item, self.build.plan
        image = self.staging / "image.qcow2"
        if not image.exists():
            raise BuildError(f"{step.task_id}: no captured image in {self.staging}")
        bom = buildsbom.ref(self.build)
        files = {sbom.FILE_NAME: buildsbom.path(self.build)} if bom else {}
        provenance = Provenance.of(source, template=plan.name, digest=plan.digest, dag_id=self.build.dag_id,
                                   run_id=self.build.run_id,
                                   sbom={**bom, "uri": ""} if bom else None,  # beside the artifact; lineage fills in where
                                   layers=layers.StagingChain(self.staging).state["reused"])  # steps it did not run
        try:
            if d.type == "VHD":
                artifact_id, artifact_uri = None, self._write_vhd(d, image)
                sbom_path = Path(artifact_uri.removeprefix("file://") + "." + sbom.FILE_NAME)
                if files:
                    shutil.copyfile(files[sbom.FILE_NAME], sbom_path)
            elif d.type == "SharedImage":
                regions = [(r.name, r.replicaCount, r.storageAccountType) for r in d.targetRegions or []] or [
                    (r, 1, d.storageAccountType or "Standard_LRS") for r in d.replicationRegions or []]
                record = self.gallery.publish_version(
                    d.galleryImageId, image, versioning=d.versioning,
                    version=self.build.params.get("galleryImageVersion"), source_version=source.get("exactVersion"),
                    exclude_from_latest=d.excludeFromLatest, target_regions=regions, artifact_tags=d.artifactTags,
                    provenance=provenance.record(), run_key=self.build.run_key, files=files)
                artifact_id, artifact_uri = record.id, record.path.as_uri()
                sbom_path = record.path.with_name(sbom.FILE_NAME)
            else:
                record = self.gallery.publish_managed_image(
                    d.imageId, d.location, image, artifact_tags=d.artifactTags, provenance=provenance.record(),
                    run_key=self.build.run_key, files=files)
                artifact_id, artifact_uri = record.id, record.path.as_uri()
                sbom_path = record.path.with_name(sbom.FILE_NAME)
        except GalleryError as e:
            raise BuildError(f"{step.task_id}: {e}") from None
        sbom_extra = {"sbom": {**(provenance.sbom or {}), "uri": sbom_path.as_uri()}} if files else {}
        runoutputs.record(plan.name, self.build.run_id, d.runOutputName, artifactId=artifact_id,
                          artifactUri=artifact_uri, provisioningState="Succeeded",
                          extra={**provenance.output_extra(), **sbom_extra})
        self.log.info("%s: %s", step.task_id, artifact_id or artifact_uri)
        return {"runOutputName": d.runOutputName, "artifactId": artifact_id, "artifactUri": artifact_uri, **sbom_extra}

    def _write_vhd(self, d: Any, image: Path) -> str:
        """A fixed VHD, its size a whole number of MiB as Azure requires."""
        if d.uri and not d.uri.startswith("file://"):
            raise BuildError(f"distribute.{d.runOutputName}: the local backend writes VHDs to file:// locations; "
                             f"'{d.uri}' needs the azure backend")
        if d.uri:
            try:
                confine.check(d.uri.removeprefix("file://"), f"distribute.{d.runOutputName}.uri")
            except confine.ConfinementError as e:
                raise BuildError(str(e)) from None
        target = Path(d.uri.removeprefix("file://")) if d.uri else (
            goldsmith_home() / "vhds" / self.build.plan.name / f"{self.build.guid}-{d.runOutputName}.vhd")
        if not target.parent.is_dir():
            target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{self.build.guid}.tmp")
        disk.to_fixed_vhd(image, tmp)
        os.replace(tmp, target)
        return target.as_uri()

    # --- what a Publisher reads (core.Captured) -----------------------------------------------------------------

    image_kind = {"osType": "Linux", "hyperVGeneration": "V1"}  # every local build: Linux, booting with BIOS

    @contextlib.contextmanager
    def fixed_vhd(self, what: str) -> Iterator[Path]:
        """The captured image as a fixed VHD in the staging area, made once. Held under a lock, so parallel
        distribute tasks share it and what they do with it (one upload for all targets)."""
        image = self.staging / "image.qcow2"
        if not image.exists():
            raise BuildError(f"{what}: no captured image in {self.staging}")
        with open(self.staging / "vhd.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            vhd = self.staging / "image.vhd"
            if not vhd.exists():
                disk.to_fixed_vhd(image, vhd)
            yield vhd

    # --- cleanup -----------------------------------------------------------------------------------------------

    def cleanup(self, *, keep_vm: bool) -> dict[str, Any]:
        marker = self.staging / MARKER
        if not marker.exists():
            self.log.info("no staging area %s: nothing to clean up", self.staging)
            return {"removed": False}
        if json.loads(marker.read_text()).get("runKey") != self.build.run_key:
            raise BuildError(f"{self.staging} was not created by this run: leaving it alone")
        vm = qemu.VMState.load(self.staging)
        if keep_vm and vm and vm.is_running():
            self.log.warning(
                "errorHandling is 'abort': the build VM is kept running for debugging.\n"
                "  ssh -i %s -p %s -o StrictHostKeyChecking=no %s@127.0.0.1\n"
                "When done: kill %s && rm -rf %s", self.staging / "id_ed25519", vm.port, BUILD_USER, vm.pid,
                self.staging)
            return {"removed": False, "kept": str(self.staging), "sshPort": vm.port}
        if vm and vm.is_running():
            vm.stop(timeout=30)
        layers.LayerCache().unref(self.staging)
        shutil.rmtree(self.staging)
        self.log.info("removed staging area %s", self.staging)
        return {"removed": True}


def _sync_unless_going_down(comm: SSHCommunicator) -> bool:
    """Flushes the guest's page cache to the overlay (a customizer's layer survives a worker killed after it).

    True when the guest went down instead: the connection dropped because the step had started a reboot.
    """
    result = comm.run("sync")
    if result.disconnected:
        return True
    if result.exit_code != 0:
        raise BuildError(f"sync failed in the build VM (exit {result.exit_code}): {' | '.join(result.tail)}")
    return False


def _run_root(comm: SSHCommunicator, command: str) -> None:
    result = comm.run(f"sudo -n {command}")
    if result.exit_code != 0:
        raise BuildError(f"`sudo {command}` failed in the build VM (exit {result.exit_code}): {' | '.join(result.tail)}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
