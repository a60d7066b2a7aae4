"""The local backend: AIB's build steps with a QEMU VM on this host.

The staging area is a directory `$GOLDSMITH_HOME/staging/IT_<rg>_<template>_<guid>/` holding everything a
build makes: the ephemeral SSH key, the copy-on-write overlay over the source disk, the cloud-init seed, the
VM's pid/port (vm.json), its serial console log, `ready` (the VM boot that has answered SSH with cloud-init
done, so later steps connect at once) and the captured image. Every step finds its inputs there by name, so
steps run in separate processes and a retried step adopts what an earlier try made.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


from goldsmith import affinity, buildsbom, confine, customizers, runoutputs, sbom, updates
from goldsmith.core import Build, BuildError
from goldsmith.communicator import CommunicatorError, SSHCommunicator, create_build_key
from goldsmith.local import baseimage, catalog, disk, qemu, vmsizes
from goldsmith.local.gallery import GalleryError, LocalGallery
from goldsmith.settings import goldsmith_home
from goldsmith.template.plan import Step

BUILD_USER = "goldsmith"
MARKER = ".goldsmith-staging"
SSH_READY_TIMEOUT = 600  # seconds: boot to SSH under software emulation takes 60-90 s, cloud-init more
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
        source = self.build.plan.template.properties.source
        try:
            if source.type == "PlatformImage":
                entry = catalog.resolve(source.publisher, source.offer, source.sku, source.version or "latest")
                return {"type": source.type, "id": entry.urn, "exactVersion": entry.exact_version, "parents": []}
            if source.type == "ManagedImage":
                image = self.gallery.resolve_managed_image(source.imageId)
                # A managed image is replaced in place: its content checksum tells one build of it from another.
                return {"type": source.type, "id": image.id, "exactVersion": "sha256:" + image.metadata["checksums"]["sha256"],
                        "path": str(image.path), "parents": [image.id]}
            version = self.gallery.resolve_image_version(source.imageVersionId)
            return {"type": source.type, "id": version.id, "exactVersion": version.version,
                    "path": str(version.path), "parents": [version.id]}
        except (catalog.CatalogError, GalleryError) as e:
            raise BuildError(f"source: {e}") from None

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
        if vm and vm.is_running():
            self.log.info("adopting the running build VM (pid %s, ssh port %s)", vm.pid, vm.port)
        else:
            overlay = self.staging / "os.qcow2"
            if not overlay.exists():
                disk.create_overlay(self._source_disk(source), overlay, self._os_disk_size_gb())
            try:
                vcpus, memory_mib = vmsizes.vm_size(self._vm_size())
            except vmsizes.VmSizeError as e:
                raise BuildError(str(e)) from None
            self.log.info("starting build VM %s: %d vCPU, %d MiB", self._vm_size(), vcpus, memory_mib)
            vm = qemu.launch(
                self.staging, overlay, vcpus=vcpus, memory_mib=memory_mib, user=BUILD_USER,
                ssh_public_key=(self.staging / "id_ed25519.pub").read_text().strip(),
                hostname=self.build.plan.name, key_path=self.staging / "id_ed25519",
            )
        started = time.monotonic()
        with self._connect(vm) as comm:
            # cloud-init has done its work: the base image's GRUB skips it at the build VM's later boots.
            # sync: the overlay on the host holds what the guest wrote even if this worker is killed next.
            _run_root(comm, f"touch {baseimage.BUILD_VM_MARKER} && sync")
        self.log.info("build VM ready: ssh on 127.0.0.1:%s after %.0f s (%s)", vm.port, time.monotonic() - started,
                      vm.accel)
        return {"pid": vm.pid, "port": vm.port, "accel": vm.accel}

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
        vm, comm = self._session()
        try:
            with comm:
                if customizers.run_linux_customizer(comm, c, name=step.name, on_line=self._on_line,
                                                 secrets=self.build.secrets):
                    self._wait_out_reboot(vm)  # a clean reboot has flushed the guest's writes
                else:
                    _sync(comm)
        except customizers.CustomizerError as e:  # downloads were already retried inside fetch()
            raise BuildError(f"{step.task_id}: {e}") from None
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
        _, comm = self._session()
        try:
            with comm:
                customizers.run_linux_validator(comm, v, name=step.name, on_line=self._on_line,
                                                secrets=self.build.secrets)
        except customizers.CustomizerError as e:
            raise BuildError(f"{step.task_id}: validation failed: {e}") from None
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
            disk.to_qcow2(self.staging / "os.qcow2", tmp)
            tmp.rename(image)
        return {"image": str(image), "virtualSize": disk.virtual_size(image)}

    def distribute(self, step: Step, source: dict[str, Any]) -> dict[str, Any]:
        d, plan = step.item, self.build.plan
        image = self.staging / "image.qcow2"
        if not image.exists():
            raise BuildError(f"{step.task_id}: no captured image in {self.staging}")
        provenance = {
            "source": {k: source.get(k) for k in ("type", "id", "exactVersion")},
            "parents": source.get("parents", []),
            "template": plan.name, "templateDigest": plan.digest,
            "dagId": self.build.dag_id, "runId": self.build.run_id,
        }
        bom = buildsbom.ref(self.build)
        files = {sbom.FILE_NAME: buildsbom.path(self.build)} if bom else {}
        if bom:
            provenance["sbom"] = {**bom, "uri": ""}  # beside the artifact; lineage fills in where
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
                    provenance=provenance, run_key=self.build.run_key, files=files)
                artifact_id, artifact_uri = record.id, record.path.as_uri()
                sbom_path = record.path.with_name(sbom.FILE_NAME)
            else:
                record = self.gallery.publish_managed_image(
                    d.imageId, d.location, image, artifact_tags=d.artifactTags, provenance=provenance,
                    run_key=self.build.run_key, files=files)
                artifact_id, artifact_uri = record.id, record.path.as_uri()
                sbom_path = record.path.with_name(sbom.FILE_NAME)
        except GalleryError as e:
            raise BuildError(f"{step.task_id}: {e}") from None
        sbom_extra = {"sbom": {**provenance["sbom"], "uri": sbom_path.as_uri()}} if files else {}
        runoutputs.record(plan.name, self.build.run_id, d.runOutputName, artifactId=artifact_id,
                          artifactUri=artifact_uri, provisioningState="Succeeded",
                          extra={"digest": plan.digest, "source": provenance["source"],
                                 "parents": provenance["parents"], **sbom_extra})
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
        shutil.rmtree(self.staging)
        self.log.info("removed staging area %s", self.staging)
        return {"removed": True}


def _sync(comm: SSHCommunicator) -> None:
    """Flushes the guest's page cache to the overlay: a customizer's layer survives a worker killed after it."""
    result = comm.run("sync")
    if result.exit_code != 0:
        raise RuntimeError(f"sync failed in the build VM (exit {result.exit_code}): {' | '.join(result.tail)}")


def _run_root(comm: SSHCommunicator, command: str) -> None:
    result = comm.run(f"sudo -n {command}")
    if result.exit_code != 0:
        raise BuildError(f"`sudo {command}` failed in the build VM (exit {result.exit_code}): {' | '.join(result.tail)}")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
