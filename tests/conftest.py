"""Shared fixtures: every test runs offline on the CPU."""

from __future__ import annotations

import logging
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("SD_APP_CACHE_DIR", tempfile.mkdtemp(prefix="sd-app-test-cache-"))  # hashes, not ~/.cache
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402

from tests.sd_fixtures import tiny_inpainting_model_dir, tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory):
    """A random tiny SD-topology model in diffusers layout (built once per test session)."""
    return tiny_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def tiny_config(tiny_model):
    return tiny_model.parent / "tiny-config"


@pytest.fixture(scope="session")
def tiny_pipe(tiny_model):
    import torch

    from pipelines.models.loading import load_pipeline

    return load_pipeline(tiny_model, device="cpu", dtype=torch.float32)  # the reference precision


@pytest.fixture(scope="session")
def tiny_inpainting_model(tmp_path_factory: pytest.TempPathFactory):
    """The tiny model with a 9-channel (SD inpainting) U-Net."""
    return tiny_inpainting_model_dir(tmp_path_factory.mktemp("inpainting-models"))


@pytest.fixture(scope="session")
def tiny_inpainting_pipe(tiny_inpainting_model):
    import torch

    from pipelines.models.loading import load_pipeline

    return load_pipeline(tiny_inpainting_model, device="cpu", dtype=torch.float32)


@pytest.fixture
def diffusers_warnings():
    """Warnings diffusers logs while the test runs (its loggers are children of ``diffusers``)."""
    records: list[logging.LogRecord] = []
    recorder = logging.Handler(logging.WARNING)
    recorder.emit = records.append
    logger = logging.getLogger("diffusers")
    logger.addHandler(recorder)
    yield records
    logger.removeHandler(recorder)
