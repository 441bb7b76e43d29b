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
