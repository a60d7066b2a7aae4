"""Goldsmith: golden VM images as Apache Airflow DAGs, from Azure VM Image Builder templates."""

__version__ = "0.1.0"
