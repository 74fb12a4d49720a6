"""What the CUDA path adds, checked without a GPU: accelerate's placement for models that may not fit one GPU,
a placed model left where it is, and a peak-memory reading per comparison row (None off the GPU)."""

import itertools

import torch

from zigzag_viz.evaluation.prompts import passkey_prompt
from zigzag_viz.evaluation.runner import Runner
from zigzag_viz.pipeline import runtime
from zigzag_viz.pipeline.models import build_tiny_model, placement, wrap_model

PROMPT = passkey_prompt(n_sentences=10, seed=41)


def test_models_are_placed_by_accelerate_on_cuda_only():
    assert placement(torch.device("cuda")) == {"device_map": "auto"}
    assert placement(torch.device("cuda", 1)) == {"device_map": "auto"}
    assert placement(torch.device("cpu")) == {}


def test_a_model_placed_by_accelerate_stays_where_it_is():
    model, tokenizer = build_tiny_model()
    model.hf_device_map = {"": "cpu"}  # what from_pretrained(device_map=...) leaves on a model
    loaded = wrap_model("placed", model, tokenizer, torch.device("meta"), use_chat_template=True)
    assert loaded.device == torch.device("cpu")  # its embedding's device, not the one asked for
    assert next(model.parameters()).device == torch.device("cpu")


def test_every_row_reports_its_own_peak_memory_and_none_off_the_gpu(tiny, monkeypatch):
    rows = Runner(tiny).compare(Runner(tiny).request(PROMPT.text, "full,zigzag,uniform", 0.4, window=16,
                                                       max_new_tokens=4))
    assert [row.peak_gpu_bytes for row in rows.results] == [None, None, None]
    assert all(row.to_json()["peak_gpu_bytes"] is None for row in rows.results)

    readings = itertools.count(1000, 1000)
    resets = []
    monkeypatch.setattr(runtime, "reset_peak_memory", lambda device: resets.append(device))
    monkeypatch.setattr(runtime, "peak_memory", lambda device: next(readings))
    runner = Runner(tiny)
    rows = runner.compare(runner.request(PROMPT.text, "full,zigzag,uniform", 0.4, window=16, max_new_tokens=4))
    # the reference (full KV's row) is read once after its prefill and decoding, each method after its own run
    assert [row.peak_gpu_bytes for row in rows.results] == [1000, 2000, 3000]
    assert len(resets) == 3
