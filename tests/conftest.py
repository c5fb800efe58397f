import os

import pytest

from hub_server import FakeHubServer, point_huggingface_hub_at


# Tests never reach the real Hub; only the `hub_server` fixture turns the network on, towards 127.0.0.1.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hub_server(tmp_path):
    """A running `FakeHubServer` that `huggingface_hub` (and diffusers through it) talks to, online, for one test.

    Downloads are cached under the test's `tmp_path`; the endpoint, offline mode and cache are restored afterwards.
    """
    with FakeHubServer() as server, point_huggingface_hub_at(server.url, cache_dir=tmp_path / "hf-hub-cache"):
        yield server
