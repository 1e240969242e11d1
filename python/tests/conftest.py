"""Shared fixtures: the repository paths, the test model, the CLI binary (KVCRUNCH_BIN or build/kvcrunch)."""
import os

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
MODEL = os.environ.get("KVCRUNCH_MODEL", os.path.join(REPO, "models", "SmolLM2-135M-Instruct.Q4_1.gguf"))
BIN = os.environ.get("KVCRUNCH_BIN", os.path.join(REPO, "build", "kvcrunch"))


@pytest.fixture(scope="session")
def model_path():
    if not os.path.isfile(MODEL):
        pytest.skip(f"test model missing: {MODEL} (scripts/fetch_model.sh)")
    return MODEL


@pytest.fixture(scope="session")
def cli_bin():
    if not os.access(BIN, os.X_OK):
        pytest.skip(f"CLI binary missing: {BIN} (cmake --build build --target kvcrunch)")
    return BIN
