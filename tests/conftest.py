import atexit
import os
import shutil
import tempfile

# Fixtures shared across test modules live in their own plugin files.
pytest_plugins = ["sshd_fixture", "base_image_fixture", "ci_skips"]

# Tests keep their scripts and files in temporary folders: allowed like an operator's GOLDSMITH_ALLOWED_PATHS
# (goldsmith/confine.py). Set before any test, so Airflow subprocesses inherit it.
os.environ.setdefault("GOLDSMITH_ALLOWED_PATHS", tempfile.gettempdir())

# Step layers (goldsmith/local/layers.py) are reused across runs by default: a layer a test run left in the shared
# cache would let the next run skip the steps it means to test. Each test session gets its own layer cache.
if "GOLDSMITH_LAYERS" not in os.environ:
    os.environ["GOLDSMITH_LAYERS"] = tempfile.mkdtemp(prefix="goldsmith-test-layers-")
    atexit.register(shutil.rmtree, os.environ["GOLDSMITH_LAYERS"], ignore_errors=True)
