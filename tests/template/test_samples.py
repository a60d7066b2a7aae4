"""Every real AIB sample and spec example has a pinned outcome, with and without --allow-placeholders.

The samples (tests/template/aib/samples, copied from ../shared/aib and github.com/Azure/azvmimagebuilder) are what users write: `<token>`
placeholders and ARM deployment templates whose parameters have no value. Checked through `goldsmith validate`
in-process, so the pinned lines are exactly what a user reads (minus the leading file name).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from goldsmith.cli import main
from goldsmith.template.loader import load_template

# A copy of ../shared/aib/{samples,spec/examples} (MIT; origins in samples/MANIFEST.tsv and spec/SOURCE.md), so the
# suite runs wherever the clone lives.
AIB = Path(__file__).resolve().parent / "aib"
SAMPLES = AIB / "samples"
EXAMPLES = AIB / "spec" / "examples"


def placeholder(path: str, token: str, more: int = 0, kind: str = "placeholder") -> str:
    places = f" (and {more} more place{'s' if more > 1 else ''})" if more else ""
    return f"{path}: unresolved {kind} <{token}>{places}: pass --set {token}=VALUE"


def parameter(path: str, name: str, more: int = 0) -> str:
    return placeholder(path, name, more, kind="ARM parameter")


def windows(prefix: str, customizers: dict[int, str]) -> list[str]:
    """The local backend (the default) builds Linux images: each Windows customizer is reported."""
    return [
        f"{prefix}customize[{i}].type: '{kind}' needs a Windows build VM and the local backend builds Linux images: "
        'set "goldsmith": {"backend": "azure"} in the template'
        for i, kind in customizers.items()
    ]


@dataclass(frozen=True)
class Expected:
    allow: list[str]  # output lines of `validate --allow-placeholders`
    strict: list[str]  # output lines of `validate` (placeholders must be resolved)


EXPECTED = {
    "Azure__deprecated__quickquickstarts__0_Creating_a_Custom_Linux_Managed_Image__helloImageTemplateLinux.json": Expected(
        allow=['valid (6 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.distribute[0].imageId', 'subscriptionID'),
            placeholder('properties.distribute[0].imageId', 'rgName'),
            placeholder('properties.distribute[0].imageId', 'imageName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__0_Creating_a_Custom_Windows_Managed_Image__helloImageTemplateWin.json": Expected(
        allow=windows('properties.', {0: 'PowerShell', 1: 'WindowsRestart', 3: 'PowerShell', 4: 'WindowsUpdate'}),
        strict=[
            placeholder('location', 'region', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.distribute[0].imageId', 'subscriptionID'),
            placeholder('properties.distribute[0].imageId', 'rgName'),
            placeholder('properties.distribute[0].imageId', 'imageName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__0_Creating_a_Custom_Windows_Managed_Image__helloImageTemplateWin01.json": Expected(
        allow=windows('resources[0].properties.', {0: 'PowerShell', 1: 'WindowsRestart', 3: 'PowerShell', 4: 'WindowsUpdate'}),
        strict=[
            parameter('resources[0].name', 'imageTemplateName'),
            parameter('resources[0].apiVersion', 'api-version'),
            parameter('resources[0].location', 'svclocation'),
            placeholder('resources[0].identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('resources[0].properties.distribute[0].imageId', 'subscriptionID'),
            placeholder('resources[0].properties.distribute[0].imageId', 'rgName'),
            placeholder('resources[0].properties.distribute[0].imageId', 'imageName'),
            placeholder('resources[0].properties.distribute[0].location', 'region'),
            placeholder('resources[0].properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__1_Creating_a_Custom_Linux_Shared_Image_Gallery_Image__helloImageTemplateforSIG.json": Expected(
        allow=['valid (8 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region1', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__1_Creating_a_Custom_Win_Shared_Image_Gallery_Image__armTemplateWinSIG.json": Expected(
        allow=windows('resources[0].properties.', {0: 'PowerShell', 1: 'WindowsRestart', 3: 'PowerShell', 4: 'WindowsUpdate'}),
        strict=[
            parameter('resources[0].name', 'imageTemplateName'),
            parameter('resources[0].apiVersion', 'api-version'),
            parameter('resources[0].location', 'svclocation'),
            placeholder('resources[0].identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('resources[0].properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('resources[0].properties.distribute[0].replicationRegions[0]', 'region1'),
            placeholder('resources[0].properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__1a_Creating_a_Custom_Linux_Image_on_Existing_VNET__existingVNETLinux.json": Expected(
        allow=['valid (9 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.vmProfile.vnetConfig.subnetId', 'subscriptionID', 1),
            placeholder('properties.vmProfile.vnetConfig.subnetId', 'vnetRgName'),
            placeholder('properties.vmProfile.vnetConfig.subnetId', 'vnetName'),
            placeholder('properties.vmProfile.vnetConfig.subnetId', 'subnetName'),
            placeholder('properties.distribute[0].imageId', 'rgName'),
            placeholder('properties.distribute[0].imageId', 'imageName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__1a_Creating_a_Custom_Win_Image_on_Existing_VNET__existingVNETWindows.json": Expected(
        allow=windows('resources[0].properties.', {0: 'PowerShell', 1: 'WindowsRestart', 3: 'PowerShell', 4: 'WindowsUpdate'}),
        strict=[
            parameter('resources[0].name', 'imageTemplateName'),
            parameter('resources[0].apiVersion', 'api-version'),
            parameter('resources[0].location', 'svclocation'),
            placeholder('resources[0].identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'subscriptionID', 1),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'vnetRgName'),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'vnetName'),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'subnetName'),
            placeholder('resources[0].properties.distribute[0].imageId', 'rgName'),
            placeholder('resources[0].properties.distribute[0].imageId', 'imageName'),
            placeholder('resources[0].properties.distribute[0].location', 'region'),
            placeholder('resources[0].properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__1b_Creating_a_Custom_Win_Image_on_Existing_VNET_Access_Storage__existingVNETWindowsAccessStor.json": Expected(
        allow=windows('resources[0].properties.', {0: 'PowerShell'}),
        strict=[
            parameter('resources[0].name', 'imageTemplateName'),
            parameter('resources[0].apiVersion', 'api-version'),
            parameter('resources[0].location', 'svclocation'),
            placeholder('resources[0].identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'subscriptionID', 1),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'vnetRgName'),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'vnetName'),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'subnetName'),
            placeholder('resources[0].properties.customize[0].scriptUri', 'scriptFileUrl'),
            placeholder('resources[0].properties.distribute[0].imageId', 'rgName'),
            placeholder('resources[0].properties.distribute[0].imageId', 'imageName'),
            placeholder('resources[0].properties.distribute[0].location', 'region'),
            placeholder('resources[0].properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__2_Creating_a_Custom_Linux_Shared_Image_Gallery_Image_from_SIG__helloImageTemplateforSIGfromSIG.json": Expected(
        allow=['valid (9 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region1', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.source.imageVersionId', 'sigDefImgVersionId'),
            placeholder('properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__2_Creating_a_Custom_Win_Shared_Image_Gallery_Image_from_SIG__helloImageTemplateforSIGfromWinSIG.json": Expected(
        allow=windows('resources[0].properties.', {0: 'PowerShell', 1: 'WindowsUpdate'}),
        strict=[
            parameter('resources[0].name', 'imageTemplateName'),
            parameter('resources[0].apiVersion', 'api-version'),
            parameter('resources[0].location', 'svclocation'),
            placeholder('resources[0].identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('resources[0].properties.source.imageVersionId', 'sigDefImgVersionId'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('resources[0].properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('resources[0].properties.distribute[0].replicationRegions[0]', 'region1'),
            placeholder('resources[0].properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__3_Customize_a_Managed_Image_and_Import_into_SIG__helloImageTemplateforReCustomization.json": Expected(
        allow=['valid (9 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region1', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.source.imageId', 'subscriptionID', 1),
            placeholder('properties.source.imageId', 'rgName', 1),
            placeholder('properties.source.imageId', 'srcImageName'),
            placeholder('properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__4_Creating_a_Custom_Linux_Image_to_VHD__helloImageTemplateVHD.json": Expected(
        allow=['valid (2 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__7_Creating_Custom_Image_using_MSI_to_Access_Storage__helloImageTemplateMsi.json": Expected(
        allow=['valid (9 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region1', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.customize[0].scriptUri', 'scriptUrl'),
            placeholder('properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__deprecated__quickquickstarts__9_Updating_Image_Builder_Templates__helloImageTemplateVersion.json": Expected(
        allow=['valid (6 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region', 1),
            placeholder('tags.templateVersion', 'imgTemplateName'),
            placeholder('properties.distribute[0].imageId', 'subscriptionID'),
            placeholder('properties.distribute[0].imageId', 'rgName'),
            placeholder('properties.distribute[0].imageId', 'imageName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__quickquickstarts__0_Creating_a_Custom_Linux_Managed_Image__helloImageTemplateLinux.json": Expected(
        allow=['valid (6 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.distribute[0].imageId', 'subscriptionID'),
            placeholder('properties.distribute[0].imageId', 'rgName'),
            placeholder('properties.distribute[0].imageId', 'imageName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__quickquickstarts__0_Creating_a_Custom_Windows_Managed_Image__helloImageTemplateWin.json": Expected(
        allow=windows('properties.', {0: 'PowerShell', 1: 'WindowsRestart', 3: 'PowerShell', 4: 'WindowsUpdate'}),
        strict=[
            placeholder('location', 'region', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.distribute[0].imageId', 'subscriptionID'),
            placeholder('properties.distribute[0].imageId', 'rgName'),
            placeholder('properties.distribute[0].imageId', 'imageName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__quickquickstarts__1_Creating_a_Custom_Linux_Shared_Image_Gallery_Image__helloImageTemplateforSIG.json": Expected(
        allow=['valid (8 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region1', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__quickquickstarts__1_Creating_a_Custom_Win_Shared_Image_Gallery_Image__armTemplateWinSIG.json": Expected(
        allow=windows('resources[0].properties.', {0: 'PowerShell', 1: 'WindowsRestart', 3: 'PowerShell', 4: 'WindowsUpdate'}),
        strict=[
            parameter('resources[0].name', 'imageTemplateName'),
            parameter('resources[0].apiVersion', 'api-version'),
            parameter('resources[0].location', 'svclocation'),
            placeholder('resources[0].identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('resources[0].properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('resources[0].properties.distribute[0].replicationRegions[0]', 'region1'),
            placeholder('resources[0].properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__quickquickstarts__1a_Creating_a_Custom_Linux_Image_on_Existing_VNET__existingVNETLinux.json": Expected(
        allow=['valid (9 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.vmProfile.vnetConfig.subnetId', 'subscriptionID', 1),
            placeholder('properties.vmProfile.vnetConfig.subnetId', 'vnetRgName'),
            placeholder('properties.vmProfile.vnetConfig.subnetId', 'vnetName'),
            placeholder('properties.vmProfile.vnetConfig.subnetId', 'subnetName'),
            placeholder('properties.distribute[0].imageId', 'rgName'),
            placeholder('properties.distribute[0].imageId', 'imageName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__quickquickstarts__1a_Creating_a_Custom_Win_Image_on_Existing_VNET__existingVNETWindows.json": Expected(
        allow=windows('resources[0].properties.', {0: 'PowerShell', 1: 'WindowsRestart', 3: 'PowerShell', 4: 'WindowsUpdate'}),
        strict=[
            parameter('resources[0].name', 'imageTemplateName'),
            parameter('resources[0].apiVersion', 'api-version'),
            parameter('resources[0].location', 'svclocation'),
            placeholder('resources[0].identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'subscriptionID', 1),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'vnetRgName'),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'vnetName'),
            placeholder('resources[0].properties.vmProfile.vnetConfig.subnetId', 'subnetName'),
            placeholder('resources[0].properties.distribute[0].imageId', 'rgName'),
            placeholder('resources[0].properties.distribute[0].imageId', 'imageName'),
            placeholder('resources[0].properties.distribute[0].location', 'region'),
            placeholder('resources[0].properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__quickquickstarts__2_Creating_a_Custom_Linux_Shared_Image_Gallery_Image_from_SIG__helloImageTemplateforSIGfromSIG.json": Expected(
        allow=['valid (9 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region1', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.source.imageVersionId', 'sigDefImgVersionId'),
            placeholder('properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__quickquickstarts__2_Creating_a_Custom_Win_Shared_Image_Gallery_Image_from_SIG__helloImageTemplateforSIGfromWinSIG.json": Expected(
        allow=windows('resources[0].properties.', {0: 'PowerShell', 1: 'WindowsUpdate'}),
        strict=[
            parameter('resources[0].name', 'imageTemplateName'),
            parameter('resources[0].apiVersion', 'api-version'),
            parameter('resources[0].location', 'svclocation'),
            placeholder('resources[0].identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('resources[0].properties.source.imageVersionId', 'sigDefImgVersionId'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('resources[0].properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('resources[0].properties.distribute[0].replicationRegions[0]', 'region1'),
            placeholder('resources[0].properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__quickquickstarts__3_Customize_a_Managed_Image_and_Import_into_SIG__helloImageTemplateforReCustomization.json": Expected(
        allow=['valid (9 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region1', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.source.imageId', 'subscriptionID', 1),
            placeholder('properties.source.imageId', 'rgName', 1),
            placeholder('properties.source.imageId', 'srcImageName'),
            placeholder('properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__quickquickstarts__4_Creating_a_Custom_Linux_Image_to_VHD__helloImageTemplateVHD.json": Expected(
        allow=['valid (2 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
        ],
    ),
    "Azure__quickquickstarts__7_Creating_Custom_Image_using_MSI_to_Access_Storage__helloImageTemplateMsi.json": Expected(
        allow=['valid (9 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region1', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.customize[0].scriptUri', 'scriptUrl'),
            placeholder('properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__quickquickstarts__8_Creating_a_Custom_Linux_Shared_Image_Gallery_Image_from_SIG__helloImageTemplateforSIGfromSIG.json": Expected(
        allow=['valid (9 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region1', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.source.imageVersionId', 'sigDefImgVersionId'),
            placeholder('properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__quickquickstarts__8_Creating_a_Custom_Win_Shared_Image_Gallery_Image_from_SIG__helloImageTemplateforSIGfromWinSIG.json": Expected(
        allow=windows('resources[0].properties.', {0: 'PowerShell', 1: 'WindowsUpdate'}),
        strict=[
            parameter('resources[0].name', 'imageTemplateName'),
            parameter('resources[0].apiVersion', 'api-version'),
            parameter('resources[0].location', 'svclocation'),
            placeholder('resources[0].identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('resources[0].properties.source.imageVersionId', 'sigDefImgVersionId'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('resources[0].properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('resources[0].properties.distribute[0].replicationRegions[0]', 'region1'),
            placeholder('resources[0].properties.distribute[0].replicationRegions[1]', 'region2'),
        ],
    ),
    "Azure__quickquickstarts__9_Setting_up_a_Trigger_with_a_Custom_Linux_Image__helloImageTemplate.json": Expected(
        allow=['properties.source.exactVersion: note: read-only field (set by the service): ignored', 'valid (8 placeholders left unresolved)'],
        strict=[
            placeholder('location', 'region1', 1),
            placeholder('identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('properties.distribute[0].galleryImageId', 'acgName'),
            placeholder('properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('properties.distribute[0].targetRegions[1].name', 'region2'),
        ],
    ),
    "Azure__solutions__14_Building_Images_WVD__armTemplateWVD.json": Expected(
        allow=windows('resources[0].properties.', {0: 'PowerShell', 1: 'PowerShell', 2: 'WindowsRestart', 3: 'PowerShell', 4: 'WindowsRestart', 5: 'WindowsUpdate'}),
        strict=[
            parameter('resources[0].name', 'imageTemplateName'),
            parameter('resources[0].apiVersion', 'api-version'),
            parameter('resources[0].location', 'svclocation'),
            placeholder('resources[0].identity.userAssignedIdentities.<imgBuilderId>', 'imgBuilderId'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'subscriptionID'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'rgName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'sharedImageGalName'),
            placeholder('resources[0].properties.distribute[0].galleryImageId', 'imageDefName'),
            placeholder('resources[0].properties.distribute[0].runOutputName', 'runOutputName'),
            placeholder('resources[0].properties.distribute[0].replicationRegions[0]', 'region1'),
        ],
    ),
    "Azure__solutions__4_Using_ENV_Variables__devOpsEnvTemplate.json": Expected(
        allow=["resources[0].properties.distribute[0].aritfactTags: unknown field 'aritfactTags' — did you mean 'artifactTags'?"],
        strict=[
            parameter('resources[0].name', 'imageTemplateName'),
            parameter('resources[0].location', 'svcLocation', 1),
            parameter('variables.resourceid', 'managedImageResGroupId', 1),
            parameter('variables.resourceid', 'managedImageName', 2),
            parameter('resources[0].properties.customize[0].inline[0]', 'targetOS'),
            parameter('resources[0].properties.customize[1].inline[0]', 'packagesToInstall'),
            "resources[0].properties.distribute[0].aritfactTags: unknown field 'aritfactTags' — did you mean 'artifactTags'?",
        ],
    ),
}


def validate(*args: str) -> tuple[int, list[str]]:
    """Runs `goldsmith validate ARGS`; returns the exit code and the output lines without the file name."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["validate", *args])
    file = args[-1]
    return code, [line.removeprefix(file).removeprefix(":").lstrip() for line in out.getvalue().splitlines()]


def test_every_sample_is_pinned():
    assert sorted(p.name for p in SAMPLES.glob("*.json")) == sorted(EXPECTED)
    assert sorted(p.name for p in SAMPLES.iterdir() if p.suffix != ".json") == ["MANIFEST.tsv", "README.md"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_with_placeholders_allowed(name):
    code, lines = validate("--allow-placeholders", str(SAMPLES / name))
    expected = EXPECTED[name].allow
    assert lines == expected
    assert code == (0 if expected[-1].startswith("valid") else 1)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_lists_every_unresolved_placeholder(name):
    code, lines = validate(str(SAMPLES / name))
    assert (code, lines) == (1, EXPECTED[name].strict)


@pytest.mark.parametrize("name", sorted(n for n, e in EXPECTED.items() if "unknown field" not in e.allow[0]))
def test_sample_with_every_placeholder_set_is_fully_resolved(name):
    """Giving each reported token a value leaves nothing unresolved (the structure was already checked)."""
    tokens = {re.search(r"<([^>]+)>", line).group(1) for line in EXPECTED[name].strict}
    # A script URL must be a fetchable URI (tests/test_hostile.py).
    values = {t: f"https://example.com/{t}" if t.lower().endswith(("url", "uri")) else f"v-{t}" for t in tokens}
    loaded = load_template(SAMPLES / name, values=values)
    assert loaded.unresolved == ()
    assert "<" not in loaded.template.model_dump_json()
    assert loaded.template.properties.distribute[0].runOutputName == "v-runOutputName"


# --- the REST spec's own examples ------------------------------------------------------------------------------

def template_body(path: Path) -> dict | None:
    """An x-ms-examples file holds the PUT body at `parameters.parameters`; the Windows excerpt is the body."""
    data = json.loads(path.read_text())
    body = data.get("parameters", {}).get("parameters", data)
    return body if "source" in body.get("properties", {}) else None


def test_spec_examples_holding_a_template():
    """The other two are a trigger and a run-output listing: not image templates."""
    holding = sorted(p.name for p in EXAMPLES.glob("*.json") if template_body(p))
    assert holding == ["CreateImageTemplateLinux.json", "CreateImageTemplateWindows.request-excerpt.json"]
    assert len(list(EXAMPLES.glob("*.json"))) == 4


def test_spec_linux_example_is_valid(tmp_path):
    (tmp_path / "linux.json").write_text(json.dumps(template_body(EXAMPLES / "CreateImageTemplateLinux.json")))
    assert validate(str(tmp_path / "linux.json")) == (0, ["valid"])


def test_spec_windows_example_is_valid_for_the_azure_backend(tmp_path):
    """The excerpt is the PUT body plus a `_note` key that says where it came from."""
    body = template_body(EXAMPLES / "CreateImageTemplateWindows.request-excerpt.json")
    assert body.pop("_note").startswith("EXCERPT")
    (tmp_path / "win.json").write_text(json.dumps(body))
    assert validate(str(tmp_path / "win.json")) == (1, windows("properties.", {
        0: "PowerShell", 1: "PowerShell", 2: "PowerShell", 3: "PowerShell", 4: "PowerShell", 5: "PowerShell",
        6: "WindowsRestart", 7: "WindowsUpdate",
    }))
    (tmp_path / "win.json").write_text(json.dumps({**body, "goldsmith": {"backend": "azure"}}))
    assert validate(str(tmp_path / "win.json")) == (0, ["valid"])
