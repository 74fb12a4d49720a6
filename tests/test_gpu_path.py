"""What the CUDA path adds, checked without a GPU: accelerate's placement for models that may not fit one GPU,
a placed model left where it is, and a peak-memory reading per comparison row (None off the GPU)."""

import itertools
import json

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


def _script(name: str):
    """A benchmark script loaded as a module."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_prepared_gpu_check_passes_on_the_cpu(tmp_path):
    check = _script("gpu_check")
    out = tmp_path / "check.json"
    assert check.main(["--device", "cpu", "--tokens", "300", "--new-tokens", "6", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    (result,) = record["checks"]
    assert record["passed"] and result["dtype"] == "float32" and result["decode_path"] == "static ragged cache, eager"
    assert max(result["capture_gap"].values()) < 1e-4
    assert set(result["static_vs_dynamic"]) >= {"zigzag", "pyramid", "uniform", "adakv", "streaming", "l2norm"}
    assert all(p["max_logit_gap"] < 1e-4 for p in result["static_vs_dynamic"].values())


def test_the_gpu_benchmark_runs_at_tiny_shapes_on_the_cpu(tmp_path, capsys):
    bench = _script("gpu_bench")
    assert bench.main(["--shape", "tiny"]) == 2  # no GPU and no --out: nothing written
    out = tmp_path / "gpu_cpu.json"
    args = ["--shape", "tiny", "--tokens", "64", "128", "--batch", "1", "2", "--decode-steps", "3", "--window", "8",
            "--max-analysis", "512", "--fit-tokens", "128", "--memory-bytes", "10000000", "--out", str(out)]
    assert bench.main(args) == 0
    record = json.loads(out.read_text())
    rows = {(r["tokens"], r["batch"], r["kept"]): r for r in record["rows"]}
    assert sorted(rows) == [(n, b, k) for n in (64, 128) for b in (1, 2) for k in (0.2, 1.0)]
    per_token = 2 * 2 * 2 * 16 * 4  # layers × (keys, values) × KV heads × head dim × float32 bytes
    for (n, batch, kept), row in rows.items():
        assert row["kv_bytes"] == batch * per_token * round(kept * n)  # real eviction: only kept tokens held
        assert row["decode_ms"] > 0 and row["decode_ms_eager"] > 0 and row["peak_gpu_bytes"] is None
        assert row["decode_ratio"] == (1.0 if kept == 1.0 else round(row["decode_ms"] / row["decode_ms_full"], 4))
        assert ("analysis_ratio" in row) == (batch == 1)
    fit = record["fit"]
    free = 10_000_000 - fit["weights_bytes"]
    assert fit["sequences_full"] == free // (per_token * 128)
    assert fit["sequences_kept_0.2"] == free // (per_token * round(0.2 * 128))
    assert record["analysis"] == {"longest_tokens": 512, "first_out_of_memory_tokens": None, "limit_tokens": 512}
    assert record["decode_path"] == "static ragged cache, eager"
