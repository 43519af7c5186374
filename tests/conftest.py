"""Test-session defaults: tests never start the framework's MLflow server or write into the repository's
results/ unless they ask to (tests of tracking and tables pass their own URIs and folders)."""

import os
import tempfile


def pytest_configure(config):
    os.environ.setdefault("SHORTCUT_TRACKING", "off")
    os.environ.setdefault("SHORTCUT_RESULTS_DIR", tempfile.mkdtemp(prefix="shortcut_test_results_"))
