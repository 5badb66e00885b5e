"""Fixtures shared by the test modules: a tiny random model in the native layout, and a pipeline over it."""

import pytest
import torch
from model_folders import save_native_model

from mochi_preview import MochiPipeline


@pytest.fixture(scope="module")
def native_dir(tmp_path_factory):
    return save_native_model(tmp_path_factory.mktemp("native"))


@pytest.fixture(scope="module")
def pipe(native_dir):
    return MochiPipeline.from_pretrained(native_dir, torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): on the shared 2-core
    machine two threads per process are up to 10x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
