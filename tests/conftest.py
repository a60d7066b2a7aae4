import os
import tempfile

# Fixtures shared across test modules live in their own plugin files.
pytest_plugins = ["sshd_fixture", "base_image_fixture", "ci_skips"]

# Tests keep their scripts and files in temporary folders: allowed like an operator's GOLDSMITH_ALLOWED_PATHS
# (goldsmith/confine.py). Set before any test, so Airflow subprocesses inherit it.
os.environ.setdefault("GOLDSMITH_ALLOWED_PATHS", tempfile.gettempdir())
