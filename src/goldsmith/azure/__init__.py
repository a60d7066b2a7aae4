"""The azure backend: AIB's build process on Azure Resource Manager, driven from Airflow (see backend.py)."""
