import os

import pytest
from accelerate.state import AcceleratorState, PartialState
from diffusers.models.attention_dispatch import _AttentionBackendRegistry

from hub_server import FakeHubServer, point_huggingface_hub_at
from trained_models import trained_digits_folder


# Tests never reach the real Hub; only the `hub_server` fixture turns the network on, towards 127.0.0.1.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def restore_active_attention_backend():
    """diffusers' ``set_attention_backend`` also sets the process-wide active backend, which
    ``reset_attention_backend`` leaves as it is: put it back after every test, so one test's backend never reaches
    the next test of the same worker."""
    active = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.fixture
def hub_server(tmp_path):
    """A running `FakeHubServer` that `huggingface_hub` (and diffusers through it) talks to, online, for one test.

    Downloads are cached under the test's `tmp_path`; the endpoint, offline mode and cache are restored afterwards.
    """
    with FakeHubServer() as server, point_huggingface_hub_at(server.url, cache_dir=tmp_path / "hf-hub-cache"):
        yield server


@pytest.fixture(scope="session")
def trained_models_root(tmp_path_factory, worker_id):
    """A folder shared by every xdist worker of this session (see `trained_models.py`)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if worker_id != "master" else base) / "trained-models"


@pytest.fixture(scope="session")
def trained_digits_dir_for(trained_models_root):
    """``objective -> folder`` of the shared digits model trained with that objective (see `trained_models.py`)."""
    return lambda objective="edm": trained_digits_folder(trained_models_root, objective)


@pytest.fixture(scope="session")
def trained_digits_dir(trained_digits_dir_for):
    """Folder of the shared EDM-trained digits pipeline (see `trained_models.py`)."""
    return trained_digits_dir_for("edm")


@pytest.fixture
def trained_digits_pipeline(trained_digits_dir):
    """The shared EDM-trained digits pipeline, loaded afresh for one test (see `trained_models.py`)."""
    from diffit_diffusers import DiffiTPipeline

    pipeline = DiffiTPipeline.from_pretrained(trained_digits_dir)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture
def fresh_accelerate_state():
    """accelerate's process-wide state reset before and after the test, so each training run builds its own."""
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()
