"""The AIB image template (`Microsoft.VirtualMachineImages/imageTemplates`, API 2025-10-01) as pydantic models.

Field names and casing are exactly AIB's, so a template round-trips unchanged. Like the service since API
2024-02-01, the models are strict: unknown fields and wrong JSON types are errors, enums are case-sensitive.
Read-only fields (server-populated: `provisioningState`, `exactVersion`, ...) are accepted and ignored; the
loader reports a note for each. See ../shared/aib/SCHEMA.md for the field reference.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from croniter import croniter
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

RESOURCE_TYPE = "Microsoft.VirtualMachineImages/imageTemplates"
API_VERSION = "2025-10-01"
NAME_PATTERN = r"^[A-Za-z0-9-_.]{1,64}$"


def ReadOnly(description: str = "read-only: set by the service, ignored here") -> Any:
    return Field(default=None, description=description, exclude=True, json_schema_extra={"readOnly": True})


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _exactly_one_script(model: Any, kind: str) -> Any:
    if model.scriptUri is not None and model.inline is not None:
        raise ValueError(f"{kind}: set either 'scriptUri' or 'inline', not both")
    if model.scriptUri is None and model.inline is None:
        raise ValueError(f"{kind}: needs 'scriptUri' (a script to download) or 'inline' (commands to run)")
    if model.inline is not None and model.sha256Checksum:
        raise ValueError(f"{kind}: 'sha256Checksum' checks a downloaded 'scriptUri'; remove it beside 'inline'")
    if model.scriptUri is not None:
        _fetchable(model.scriptUri, f"{kind} scriptUri")
    return model


def _fetchable(uri: str, what: str) -> str:
    """A source the worker can fetch: https://, http:// or file:// (checked again, with the allowed roots and
    hosts, when fetched). One starting with an unresolved placeholder (masked as `__name__`) is checked once it
    has a value."""
    if uri.startswith("__"):
        return uri
    if not uri.lower().startswith(("https://", "http://", "file://")) or uri.lower() in ("https://", "http://",
                                                                                     "file://"):
        raise ValueError(f"{what} '{uri[:100]}' must be an https://, http:// or file:// URI")
    return uri


# --- source ---------------------------------------------------------------------------------------------------

class PlatformImagePurchasePlan(Strict):
    planName: str
    planProduct: str
    planPublisher: str


class PlatformImageSource(Strict):
    type: Literal["PlatformImage"]
    publisher: str | None = None
    offer: str | None = None
    sku: str | None = None
    version: str | None = Field(None, description="an exact version, or 'latest' (resolved at build time)")
    planInfo: PlatformImagePurchasePlan | None = None
    exactVersion: Any = ReadOnly()


class ManagedImageSource(Strict):
    type: Literal["ManagedImage"]
    imageId: str = Field(description="ARM id of a generalized Microsoft.Compute/images resource")


class SharedImageVersionSource(Strict):
    type: Literal["SharedImageVersion"]
    imageVersionId: str = Field(description="ARM id of a gallery image version; '.../versions/latest' resolves at build time")
    exactVersion: Any = ReadOnly()


Source = Annotated[Union[PlatformImageSource, ManagedImageSource, SharedImageVersionSource], Field(discriminator="type")]
SOURCE_TYPES = ("PlatformImage", "ManagedImage", "SharedImageVersion")


# --- customizers and validators -------------------------------------------------------------------------------

class ShellCustomizer(Strict):
    type: Literal["Shell"]
    name: str | None = None
    scriptUri: str | None = None
    inline: list[str] | None = None
    sha256Checksum: str = ""

    _one_script = model_validator(mode="after")(lambda self: _exactly_one_script(self, "Shell"))


class PowerShellCustomizer(Strict):
    type: Literal["PowerShell"]
    name: str | None = None
    scriptUri: str | None = None
    inline: list[str] | None = None
    sha256Checksum: str = ""
    runElevated: bool = False
    runAsSystem: bool = False
    validExitCodes: list[int] = Field(default_factory=lambda: [0])

    @model_validator(mode="after")
    def _check(self) -> PowerShellCustomizer:
        _exactly_one_script(self, "PowerShell")
        if self.runAsSystem and not self.runElevated:
            raise ValueError("PowerShell: 'runAsSystem' needs 'runElevated': true")
        return self


class FileCustomizer(Strict):
    type: Literal["File"]
    name: str | None = None
    sourceUri: Annotated[str, AfterValidator(lambda uri: _fetchable(uri, "File sourceUri"))]
    destination: str = Field(description="absolute path including the file name; its parent directory must exist")
    sha256Checksum: str = ""


class WindowsRestartCustomizer(Strict):
    type: Literal["WindowsRestart"]
    name: str | None = None
    restartCommand: str = 'shutdown /r /f /t 0 /c "packer restart"'
    restartCheckCommand: str = ""
    restartTimeout: Annotated[str, Field(pattern=r"^\d+[smh]$")] = "5m"


class WindowsUpdateCustomizer(Strict):
    type: Literal["WindowsUpdate"]
    name: str | None = None
    searchCriteria: str = ""
    filters: list[str] = Field(default_factory=list)
    updateLimit: Annotated[int, Field(ge=0)] = 0


Customizer = Annotated[
    Union[ShellCustomizer, PowerShellCustomizer, FileCustomizer, WindowsRestartCustomizer, WindowsUpdateCustomizer],
    Field(discriminator="type"),
]
CUSTOMIZER_TYPES = ("Shell", "PowerShell", "File", "WindowsRestart", "WindowsUpdate")
WINDOWS_ONLY_CUSTOMIZERS = ("PowerShell", "WindowsRestart", "WindowsUpdate")


class ShellValidator(ShellCustomizer):
    pass


class PowerShellValidator(PowerShellCustomizer):
    pass


class FileValidator(FileCustomizer):
    pass


InVMValidator = Annotated[Union[ShellValidator, PowerShellValidator, FileValidator], Field(discriminator="type")]
VALIDATOR_TYPES = ("Shell", "PowerShell", "File")


class Validate(Strict):
    continueDistributeOnFailure: bool = False
    sourceValidationOnly: bool = False
    inVMValidations: list[InVMValidator] = Field(default_factory=list)


# --- distribution ---------------------------------------------------------------------------------------------

StorageAccountType = Literal["Standard_LRS", "Standard_ZRS", "Premium_LRS"]
def _not_dots(name: str) -> str:
    if name.startswith("."):  # AIB's pattern allows it; as a file name ('.', '..') it would leave its folder
        raise ValueError(f"runOutputName '{name}' must not start with '.': it names a file of the run outputs")
    return name


RunOutputName = Annotated[
    str, Field(pattern=NAME_PATTERN, description="unique per template; names the run output"), AfterValidator(_not_dots)
]


class TargetRegion(Strict):
    name: str
    replicaCount: Annotated[int, Field(ge=1)] = 1
    storageAccountType: StorageAccountType = "Standard_LRS"


class LatestVersioner(Strict):
    scheme: Literal["Latest"]
    major: Annotated[int, Field(ge=-1)] = -1


class SourceVersioner(Strict):
    scheme: Literal["Source"]


Versioner = Annotated[Union[LatestVersioner, SourceVersioner], Field(discriminator="scheme")]


class ManagedImageDistributor(Strict):
    type: Literal["ManagedImage"]
    runOutputName: RunOutputName
    artifactTags: dict[str, str] = Field(default_factory=dict)
    imageId: str
    location: str


class SharedImageDistributor(Strict):
    type: Literal["SharedImage"]
    runOutputName: RunOutputName
    artifactTags: dict[str, str] = Field(default_factory=dict)
    galleryImageId: str = Field(description="an image definition id (auto version) or '.../versions/x.y.z' (explicit)")
    targetRegions: list[TargetRegion] | None = None
    replicationRegions: list[str] | None = Field(None, description="deprecated: use targetRegions")
    storageAccountType: StorageAccountType | None = Field(None, description="deprecated: only with replicationRegions")
    excludeFromLatest: bool = False
    versioning: Versioner | None = None
    replicationMode: Literal["Full", "Shallow"] | None = None

    @model_validator(mode="after")
    def _check(self) -> SharedImageDistributor:
        if self.targetRegions is not None and self.replicationRegions is not None:
            raise ValueError("SharedImage: set either 'targetRegions' or the deprecated 'replicationRegions', not both")
        if self.storageAccountType is not None and self.replicationRegions is None:
            raise ValueError(
                "SharedImage: 'storageAccountType' only goes with 'replicationRegions'; "
                "with 'targetRegions' set it per region"
            )
        return self


class VhdDistributor(Strict):
    type: Literal["VHD"]
    runOutputName: RunOutputName
    artifactTags: dict[str, str] = Field(default_factory=dict)
    uri: str | None = Field(None, description="where to write the VHD; empty: the staging storage")


Distributor = Annotated[
    Union[ManagedImageDistributor, SharedImageDistributor, VhdDistributor], Field(discriminator="type")
]
DISTRIBUTOR_TYPES = ("ManagedImage", "SharedImage", "VHD")


# --- the rest of properties -----------------------------------------------------------------------------------

OnOff = Literal["Enabled", "Disabled"]


class VmBoot(Strict):
    state: OnOff | None = None


class Workload(Strict):
    state: OnOff | None = None
    scriptUri: str | None = None
    sha256Checksum: str = ""


class Optimize(Strict):
    vmBoot: VmBoot | None = None
    workload: Workload | None = None


class ErrorHandling(Strict):
    onCustomizerError: Literal["cleanup", "abort"] = "cleanup"
    onValidationError: Literal["cleanup", "abort"] = "cleanup"


class VirtualNetworkConfig(Strict):
    subnetId: str | None = None
    containerInstanceSubnetId: str | None = None
    proxyVmSize: str | None = None

    @model_validator(mode="after")
    def _check(self) -> VirtualNetworkConfig:
        if self.containerInstanceSubnetId is not None and self.proxyVmSize is not None:
            raise ValueError("vnetConfig: set either 'containerInstanceSubnetId' or 'proxyVmSize', not both")
        if self.containerInstanceSubnetId is not None and self.subnetId is None:
            raise ValueError("vnetConfig: 'containerInstanceSubnetId' needs 'subnetId' (a subnet of the same VNet)")
        return self


class VmProfile(Strict):
    vmSize: str = Field("", description="empty: Standard_D1_v2 (Gen1 sources) or Standard_D2ds_v4 (Gen2)")
    osDiskSizeGB: Annotated[int, Field(ge=0)] = 0
    userAssignedIdentities: list[str] | None = None
    vnetConfig: VirtualNetworkConfig | None = None


class DataDisk(Strict):
    sizeGB: Annotated[int, Field(ge=0)] | None = None


class AutoRun(Strict):
    state: OnOff | None = None


class ImageTemplateProperties(Strict):
    source: Source
    customize: list[Customizer] = Field(default_factory=list)
    optimize: Optimize | None = None
    validate_: Validate | None = Field(None, alias="validate")
    distribute: Annotated[list[Distributor], Field(min_length=1)]
    errorHandling: ErrorHandling | None = None
    buildTimeoutInMinutes: Annotated[int, Field(ge=0, le=960, description="0: 240 minutes")] = 0
    vmProfile: VmProfile | None = None
    additionalDataDisks: list[DataDisk] | None = None
    stagingResourceGroup: str | None = None
    autoRun: AutoRun | None = None
    managedResourceTags: dict[str, str] | None = None
    provisioningState: Any = ReadOnly()
    provisioningError: Any = ReadOnly()
    lastRunStatus: Any = ReadOnly()
    exactStagingResourceGroup: Any = ReadOnly()

    model_config = ConfigDict(populate_by_name=True, serialize_by_alias=True)

    @model_validator(mode="after")
    def _unique_run_outputs(self) -> ImageTemplateProperties:
        names = [d.runOutputName for d in self.distribute]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"runOutputName must be unique per template; repeated: {', '.join(duplicates)}")
        return self


class UserAssignedIdentity(Strict):
    principalId: Any = ReadOnly()
    clientId: Any = ReadOnly()


class ImageTemplateIdentity(Strict):
    type: Literal["UserAssigned", "None"]
    userAssignedIdentities: dict[str, UserAssignedIdentity] | None = None


class ImageTemplate(Strict):
    """The resource body. `identity` is optional here: the Airflow connection is the build's identity."""

    location: str | None = Field(None, description="required in resource bodies and ARM templates; an AIB region")
    tags: dict[str, str] | None = None
    identity: ImageTemplateIdentity | None = None
    properties: ImageTemplateProperties
    # The ARM envelope: accepted as AIB and ARM accept it, ignored (the template's name is its file name).
    type: str | None = None
    apiVersion: str | None = None
    name: str | None = None
    dependsOn: list[str] | None = None
    id: Any = ReadOnly()
    systemData: Any = ReadOnly()


class SecretRef(Strict):
    """Where a secret lives in Airflow: a connection's field, or a variable (see goldsmith/secrets.py)."""

    connection: str | None = None
    field: Literal["password", "login", "host", "schema", "port", "extra", "uri"] = "password"
    variable: str | None = None

    @model_validator(mode="after")
    def _one_place(self) -> SecretRef:
        if (self.connection is None) == (self.variable is None):
            raise ValueError("a secret comes from either 'connection' (with 'field', default password) "
                             "or 'variable'")
        return self


SecretName = Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")]


class SbomPolicy(Strict):
    """A gate on what the image contains, checked on its SBOM before the build VM is generalized."""

    forbiddenPackages: list[str] = Field(
        default_factory=list, description="glob patterns of package names (e.g. 'telnet*') that fail the build")
    pendingUpdates: Literal["ignore", "warn", "fail"] = Field(
        "ignore", description="what newer versions in the image's apt sources (updateSuites) do to the build")
    updateSuites: list[str] | None = Field(
        None, description="suites whose pending updates the gate counts; default: those named '*security*'")


class GoldsmithOptions(Strict):
    """The one block AIB has no field for: how Goldsmith schedules and runs the build.

    It sits at the top level of the template file under the key `goldsmith`, beside the AIB document, and is
    removed before the AIB part is validated, so the rest of the file stays valid AIB.
    """

    backend: Literal["local", "azure"] = "local"
    schedule: str | None = Field(None, description="cron expression or preset such as '@weekly'; none: on demand only")
    rebuild: Literal["onChange", "always", "onUpdates"] = Field(
        "onChange", description="onChange: a scheduled run skips when source, template and scripts are unchanged; "
        "onUpdates: it also builds when the image's apt sources carry newer versions of its packages"
    )
    reuseLayers: bool = Field(
        True, description="start from cached step layers of earlier runs (local backend); only with rebuild 'onChange'"
    )
    sbom: SbomPolicy = Field(default_factory=SbomPolicy)
    retries: Annotated[int, Field(ge=0, le=10)] = 2
    retryDelaySeconds: Annotated[int, Field(ge=1, le=3600)] = 30
    owner: Annotated[str, Field(min_length=1, max_length=500)] = "goldsmith"
    tags: list[Annotated[str, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=50, description="extra DAG tags (Airflow stores at most 100 characters)"
    )
    description: str | None = None
    azureConnectionId: str = Field("azure_default", description="Airflow connection used by the azure backend")
    sourceTrigger: bool = Field(
        False, description="AIB's SourceImage trigger: rebuild when the source gets a new version (polled)"
    )
    sourcePollSeconds: Annotated[int, Field(ge=10, le=86400)] = 300
    secrets: dict[SecretName, SecretRef] = Field(
        default_factory=dict,
        description="environment variables for Shell customizers and validators, read from Airflow connections "
        "and variables at build time and masked in logs (never written in the template)",
    )

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        # Checked here, not by Airflow: a cron Airflow refuses would drop the DAG without its placeholder.
        if value is None or value in SCHEDULE_PRESETS:
            return value
        if len(value.split()) != 5 or not croniter.is_valid(value):
            raise ValueError(f"'{value}' is not a cron expression (five fields, e.g. '0 3 * * 1') nor one of "
                             f"{', '.join(SCHEDULE_PRESETS)}")
        return value


SCHEDULE_PRESETS = ("@once", "@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly", "@annually")
