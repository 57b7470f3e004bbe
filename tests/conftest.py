import os

import pytest


# Decoded-image cache per test session, never the user's ~/.cache.
@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    os.environ["MEDFED_CACHE_DIR"] = str(tmp_path_factory.mktemp("medfed-cache"))
    yield
