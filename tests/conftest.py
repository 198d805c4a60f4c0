import logging

import pytest

from sdxl.random_weights import write_tiny_weights


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_weights_dir(tmp_path_factory):
    """The seeded tiny weight set, written once per test session in the production layout."""
    logging.getLogger("sdxl").setLevel(logging.INFO)
    return write_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def pipes(tiny_weights_dir):
    from sdxl.loading import load_pipelines

    return load_pipelines(tiny_weights_dir)


@pytest.fixture
def listener():
    """A loopback listener that must receive no connection (a refusal happens before any connect)."""
    from tests.file_input_servers import SilentListener

    silent = SilentListener()
    yield silent
    silent.close()


@pytest.fixture
def files():
    """A loopback file server that records who fetched what."""
    from sdxl.testing.file_server import FileServer

    server = FileServer()
    yield server
    server.close()
