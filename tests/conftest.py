import os
from collections.abc import Iterator
from typing import Any

import matplotlib
import pytest
import torch

from tests.postgres import PostgresUnavailable, create_database, postgres_server

matplotlib.use("Agg")

REQUIRE_POSTGRES = "NMSEARCH_REQUIRE_POSTGRES"  # set by CI: a missing server fails instead of skipping


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
