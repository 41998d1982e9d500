import os

import pytest

from llmos import loader


@pytest.fixture(autouse=True, scope="session")
def kernels_from_the_real_home():
    """Load the C++ decode kernels (llmos/kernels) once per session from the user's LLMOS_HOME, before
    tests point LLMOS_HOME at temporary folders: `llmos run` uses them by default, and each test with
    a fresh home would otherwise compile them again (a minute). 0.4 s when already built."""
    if os.environ.get("LLMOS_KERNELS", "1") != "0":
        from llmos import kernels

        kernels.load()
    yield


def load_model(name, device: str = "cpu", dtype=None):
    """(model, tokenizer, checkpoint) of a name through the loader, on the PyTorch path: what many tests compare."""
    r = loader.load(str(name), "torch", device, precision=dtype, tokenizer=False)
    return r.model, r.tokenizer, r.checkpoint


def load_precision(name, precision=None, device: str = "cpu", group_size=None):
    """load_model at a precision: f32 | f16 | bf16, or int8 | int4 quantized after loading."""
    r = loader.load(str(name), "torch", device, precision=precision, group_size=group_size, tokenizer=False)
    return r.model, r.tokenizer, r.checkpoint
