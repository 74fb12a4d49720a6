"""One prepared check of the CUDA path: run it first on a machine with a GPU, before any GPU figure is trusted.

    python benchmarks/gpu_check.py --out gpu_check.json            # on the GPU machine (cuda by default there)
    python benchmarks/gpu_check.py --device cpu --out /tmp/c.json  # the same checks on the CPU (a test does this)

A random Llama with grouped-query attention, built from a config in code (nothing downloaded, no tokenizer), in
float32 and, on CUDA, bfloat16:
- capture exactness: the window capture's entropy, attention rows and hidden-state change against eager
  attention maps (`output_attentions`);
- identity at kept fraction 1.0: uniform and ZigZag keep everything and decode full KV's tokens;
- the decode path used on the device (static ragged cache, replayed as a CUDA graph on CUDA) against the
  dynamic cache, for every token-budget method at kept 0.3: the same greedy tokens, and the logits' largest gap.
Needs only torch, transformers and numpy beside the package. Prints and writes one JSON record; exit status 1
when a check fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import transformers

from zigzag_viz.methods import METHODS, CompressionContext
from zigzag_viz.methods.calibration import CalibratedMethod
from zigzag_viz.pipeline import attention, runtime
from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline.models import default_device, wrap_model

SHAPE = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=2048, max_position_embeddings=4096)
TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2}


def build(device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).to(dtype)
    return wrap_model(f"random-llama-{str(dtype).removeprefix('torch.')}", model, None, device, use_chat_template=False)


def capture_gap(loaded, ids: torch.Tensor, window: int) -> dict:
    """Largest gaps between the window capture and eager attention maps."""
    analysis = runtime.prefill(loaded, ids, window).analysis
    with attention.implementation(loaded.model, "eager"), torch.inference_mode():
        out = loaded.model(ids, output_attentions=True, output_hidden_states=True, use_cache=False)
    n = ids.shape[1]
    w = min(window, n)
    probs = [maps[0, :, n - w:, :].double().cpu() for maps in out.attentions]
    entropy = np.stack([torch.special.entr(p).sum(-1).mean(-1).numpy() for p in probs])
    rows = np.stack([p.mean(1).numpy() for p in probs])
    hidden = np.stack([(1 - torch.nn.functional.cosine_similarity(
        out.hidden_states[i][0].float(), out.hidden_states[i + 1][0].float(), dim=-1)).cpu().numpy()
        for i in range(len(out.attentions) - 1)])
    return {"entropy": float(np.abs(analysis.entropy - entropy).max()),
            "attention_rows": float(np.abs(analysis.attention_rows - rows).max()),
            "hidden_change": float(np.abs(analysis.hidden_change[: len(hidden)] - hidden).max())}


def decode(loaded, pre, spec: str, budget: float, new_tokens: int, static: bool | None):
    """Greedy tokens and step logits from a copy of the prefill compressed by `spec` at `budget`."""
    method = METHODS[spec]()
    cache = kvcache.clone(pre.cache)
    method.compress(cache, CompressionContext(pre.analysis, budget, loaded=loaded))
    tokens, logits = runtime.greedy_decode(loaded, cache, pre.next_logits, pre.n_tokens, new_tokens, static=static)
    return tokens, torch.stack(logits).float().cpu()


def check(device: torch.device, dtype: torch.dtype, tokens: int, new_tokens: int) -> dict:
    loaded = build(device, dtype)
    ids = torch.randint(1, SHAPE["vocab_size"], (1, tokens), generator=torch.Generator().manual_seed(1)).to(device)
    tolerance = TOLERANCE[dtype]
    gaps = capture_gap(loaded, ids, window=32)
    specs = [n for n, cls in METHODS.items() if cls.stage == "tokens" and not cls.lossless
             and not (issubclass(cls, CalibratedMethod) and cls().calibrates)]
    pre = runtime.prefill(loaded, ids, 32, needs=frozenset().union(*(METHODS[s]().prefill_needs for s in specs)))
    full, _ = runtime.greedy_decode(loaded, kvcache.clone(pre.cache), pre.next_logits, pre.n_tokens, new_tokens,
                                    static=False)
    identity = {spec: decode(loaded, pre, spec, 1.0, new_tokens, static=None)[0] == full for spec in ("uniform", "zigzag")}
    paths = {}
    for spec in specs:
        dynamic, dynamic_logits = decode(loaded, pre, spec, 0.3, new_tokens, static=False)
        device_path, device_logits = decode(loaded, pre, spec, 0.3, new_tokens, static=None if device.type == "cuda" else True)
        steps = min(len(dynamic_logits), len(device_logits))
        paths[spec] = {"same_tokens": dynamic == device_path,
                       "max_logit_gap": float((dynamic_logits[:steps] - device_logits[:steps]).abs().max())}
    return {
        "dtype": str(dtype).removeprefix("torch."), "tokens": tokens, "new_tokens": new_tokens,
        "capture_gap": gaps, "capture_passed": max(gaps.values()) < tolerance,
        "identity_at_1.0": identity, "identity_passed": all(identity.values()),
        "decode_path": "static ragged cache, CUDA graph" if device.type == "cuda" else "static ragged cache, eager",
        "static_vs_dynamic": paths, "static_passed": all(p["same_tokens"] for p in paths.values()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    parser.add_argument("--tokens", type=int, default=700)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    device = torch.device(args.device) if args.device else default_device()
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    record = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "checks": [check(device, dtype, args.tokens, args.new_tokens) for dtype in dtypes],
    }
    record["passed"] = all(c["capture_passed"] and c["identity_passed"] and c["static_passed"] for c in record["checks"])
    text = json.dumps(record, indent=2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text + "\n")
    print(text)
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
