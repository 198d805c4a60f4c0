import logging
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Both before torch loads; the processes the tests start (Cog servers, benchmarks) inherit them.
# MKL's default code paths may round differently with the memory alignment of their operands, so two loads of the same
# weights (mmap-backed in diffusers, copied in ours) can differ in the last bit (2e-7 to 5e-7 after one attention
# projection of the tiny UNet): enough to move a pixel by 1 of 255 where tests compare with diffusers bit for bit.
# MKL's strict reproducible branch does not depend on alignment.
os.environ.setdefault("MKL_CBWR", "AVX2,STRICT")
# The processes the tests start (scripts, Cog workers, benchmarks) import this checkout, whatever is installed.
os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
# OMP_WAIT_POLICY stays at OpenMP's default here: PASSIVE (threads sleep at every barrier) took the generation tests
# from 13.6 s to 31.0 s on an idle 2-core machine; it only pays when several torch processes share the cores.

from sdxl.model.random_weights import write_tiny_weights  # noqa: E402


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
    from sdxl.model.loading import load_pipelines

    return load_pipelines(tiny_weights_dir)


@pytest.fixture
def listener():
    """A loopback listener that must receive no connection (a refusal happens before any connect)."""
    from tools.testing.file_input_servers import SilentListener

    silent = SilentListener()
    yield silent
    silent.close()


@pytest.fixture
def files():
    """A loopback file server that records who fetched what."""
    from tools.testing.file_server import FileServer

    server = FileServer()
    yield server
    server.close()
