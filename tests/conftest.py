import os

import pytest


@pytest.fixture(autouse=True, scope="session")
def kernels_from_the_real_home():
    """Load the C++ decode kernels (llmos/kernels) once per session from the user's LLMOS_HOME, before
    tests point LLMOS_HOME at temporary folders: `llmos run` uses them by default, and each test with
    a fresh home would otherwise compile them again (a minute). 0.4 s when already built."""
    if os.environ.get("LLMOS_KERNELS", "1") != "0":
        from llmos import kernels

        kernels.load()
    yield
