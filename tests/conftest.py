# Fixtures shared across test modules live in their own plugin files.
pytest_plugins = ["sshd_fixture", "base_image_fixture", "ci_skips"]
