"""Airflow discovers this file: one build DAG per image template in the templates folder.

The folder is `$GOLDSMITH_TEMPLATES`, else `[goldsmith] templates_folder` in airflow.cfg, else include/templates of
the checkout (goldsmith.settings.templates_dir). A team with Goldsmith installed into its own Airflow
drops these two lines into its DAGs folder as they are."""

from goldsmith.dag_factory import build_dags

globals().update(build_dags())
