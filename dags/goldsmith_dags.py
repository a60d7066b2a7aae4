"""Airflow discovers this file: one build DAG per image template in include/templates/ (or $GOLDSMITH_TEMPLATES)."""

from goldsmith.dag_factory import build_dags

globals().update(build_dags())
