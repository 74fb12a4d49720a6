import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("ZIGZAG_VIZ_DEVICE", "cpu")

import pytest
import torch

from zigzag_viz.pipeline.models import load_model


@pytest.fixture(scope="session")
def tiny():
    """The tiny random GQA Llama (4 layers, 4 query heads, 2 KV heads), float32 on the CPU."""
    return load_model("tiny", "cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, float32 on the CPU."""
    return load_model("smollm2", "cpu")


@pytest.fixture()
def random_ids(tiny):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(100, 20000, (1, 300), generator=generator)
