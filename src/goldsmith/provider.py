"""Provider metadata for Airflow (entry point `apache_airflow_provider`): Goldsmith appears under Providers in
the UI and in `airflow providers list`, with its operators, triggers, hook, extra link and config section."""

from __future__ import annotations

from importlib.metadata import version
from typing import Any


def get_provider_info() -> dict[str, Any]:
    return {
        "package-name": "goldsmith",
        "name": "Goldsmith",
        "description": "Golden VM images as Airflow DAGs, from Azure VM Image Builder templates.",
        "versions": [version("goldsmith")],
        "integrations": [{"integration-name": "Goldsmith", "tags": ["software"],
                          "external-doc-url": "https://learn.microsoft.com/azure/virtual-machines/image-builder-overview"}],
        "operators": [{"integration-name": "Goldsmith",
                       "python-modules": ["goldsmith.operators.steps", "goldsmith.azure.janitor"]}],
        "triggers": [{"integration-name": "Goldsmith",
                      "python-modules": ["goldsmith.triggers", "goldsmith.azure.triggers"]}],
        # The hook uses the `azure` connection type of apache-airflow-providers-microsoft-azure; it adds none.
        "hooks": [{"integration-name": "Goldsmith", "python-modules": ["goldsmith.azure.hooks"]}],
        "extra-links": ["goldsmith.links.ArtifactLink"],
        "config": {
            "goldsmith": {
                "description": "Goldsmith: where the image templates (one DAG each) are read from.",
                "options": {
                    "templates_folder": {
                        "description": "Folder of image template files (*.json). $GOLDSMITH_TEMPLATES overrides "
                                       "it; when neither is set, include/templates of a source checkout.",
                        "version_added": "0.1.0",
                        "type": "string",
                        "example": "/opt/airflow/templates",
                        "default": "",
                    },
                },
            },
        },
    }
