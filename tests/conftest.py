import os
from collections.abc import Iterator
from typing import Any

import matplotlib
import pytest
import torch

from search_space.row_extension import extension_dir
from tests.postgres import PostgresUnavailable, create_database, postgres_server

matplotlib.use("Agg")

REQUIRE_POSTGRES = "NMSEARCH_REQUIRE_POSTGRES"  # set by CI: a missing server fails instead of skipping
# The fused row-skipping extension is built once per machine into the real cache, also for tests
# that point NMSEARCH_CACHE_DIR at a temporary folder (it would be rebuilt there, 20-40 s each).
os.environ.setdefault("NMSEARCH_EXTENSION_DIR", str(extension_dir().parent))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for a module of tiny models: faster, and far faster on a loaded
    2-core machine, where a second thread stalls whenever it is preempted. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def postgres() -> Iterator[dict[str, Any]]:
    """A PostgreSQL server on loopback for this test session (see tests/postgres.py)."""
    try:
        with postgres_server() as server:
            yield server
    except PostgresUnavailable as error:
        if os.environ.get(REQUIRE_POSTGRES):
            pytest.fail(str(error))
        pytest.skip(str(error))


@pytest.fixture
def postgres_url(postgres: dict[str, Any]) -> str:
    """A fresh, empty database on the session's server, as a ``postgresql://`` URL."""
    return create_database(postgres)
