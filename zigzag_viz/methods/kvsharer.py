"""KVSharer: later layers reuse an earlier, *dissimilar* layer's KV cache; the plan is calibrated once per model.

KVSharer (Yang et al., arXiv 2410.18517) observes that letting a layer reuse the cache of a layer whose cache
is most *unlike* its own hurts less than sharing similar ones. Calibration, once per model (saved as JSON):

1. on a handful of generated passkey prompts, the mean key and the mean value of each layer (over tokens,
   then over prompts), flattened into one vector per layer;
2. every layer pair (source m < target l, both of the same attention kind) ranked by the Euclidean distance
   of those vectors, most dissimilar first;
3. greedily, a pair is accepted when its target is neither a source nor a target yet, its source is not a
   target, and the model still behaves: with every accepted sharing (and the candidate) applied to the
   prefilled cache of each calibration prompt minus its last few tokens, feeding those tokens through it
   gives logits whose cosine with the full cache's logits is ≥ `threshold` (mean over tokens and prompts);
4. stop once round(share·L) layers share.

Storage: a target layer holds no tensor at all. Its `update` ignores its own new keys/values and returns the
source layer's current dense keys and values (the source is earlier, so it has already taken this step's
token). Differences from the paper: there sharing is applied from prefill on and the check compares the last
layer's hidden state; here compression happens after a full prefill (METHOD §6), so the check feeds tokens
through the compressed cache and compares the last tokens' logits (the final hidden state through the LM head).

"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np
import torch

from ..pipeline import cache as kvcache
from ..pipeline import runtime
from ..errors import InputError
from ..pipeline.models import LoadedModel
from .base import CompressionReport, Parameter, register
from .calibration import (
    CalibratedMethod,
    CalibrationSet,
    Progress,
    context_model,
    layer_kind,
    model_fingerprint,
    report_progress,
    shallow_cache,
)


# ---------------------------------------------------------------- KVSharer


class SharedLayer(kvcache.CompressedLayer):
    """A layer that stores nothing and attends over another (earlier) layer's keys and values."""

    def __init__(self, source, source_index: int):
        super().__init__()
        self.source = source
        self.source_index = source_index
        self.keys = self.values = None

    def update(self, key_states, value_states, *args, **kwargs):
        """This layer's own new keys/values are dropped: attention reads the source layer's (already updated) cache."""
        return self.source.keys, self.source.values

    def tensors(self):
        return []

    def held_tokens(self) -> int:
        """Tokens attention sees through this layer (none of them stored here)."""
        return int(self.source.keys.shape[-2])


def apply_sharing(cache, pairs: list[tuple[int, int]]) -> None:
    """Replace each target layer by a SharedLayer reading its source: pairs are (target, source), source < target."""
    for target, source in pairs:
        if not kvcache.is_dense(cache, source) or not kvcache.is_dense(cache, target):
            raise InputError("kvsharer shares dense layers: it cannot follow a method that changed their storage")
        cache.layers[target] = SharedLayer(cache.layers[source], source)


@register
class KVSharer(CalibratedMethod):
    name = "kvsharer"
    summary = "later layers reuse the cache of the most dissimilar earlier layer that keeps outputs close (calibrated once)"
    paper = "KVSharer (arXiv 2410.18517)"
    compresses = "whole layers (shared)"
    stage = "layers"
    calibration = "once per model: mean KV per layer and an output-cosine check on generated prompts"
    leaves_dense = False
    parameters = {
        "share": Parameter(float, 0.25, "fraction of layers that reuse another layer's cache", low=0.0, high=0.9),
        "threshold": Parameter(float, 0.95, "min cosine of last-token logits vs full on calibration prompts",
                               low=-1.0, high=1.0),
    }
    calibration_set: ClassVar[CalibrationSet] = CalibrationSet()
    check_tokens: ClassVar[int] = 8

    def target_count(self, num_layers: int) -> int:
        return min(int(round(self.params["share"] * num_layers)), max(num_layers - 1, 0))

    def calibration_key(self, loaded: LoadedModel, share: float | None = None) -> str:
        share = self.params["share"] if share is None else share
        return (
            f"{model_fingerprint(loaded)}|share={share}|threshold={self.params['threshold']}"
            f"|tail={self.check_tokens}|{self.calibration_set.key}"
        )

    def stored_alternative(self, loaded: LoadedModel, entries: dict) -> dict | None:
        """The plan cut from a stored plan of the same search with a larger share, if any.

        The greedy search accepts pairs in one fixed order, so the plan for a smaller share is the start of the
        plan for a larger one (same threshold): a stored larger plan, or one whose search ran out of pairs, is
        reused for any smaller share without recomputing.
        """
        wanted = self.target_count(loaded.num_layers)
        for share in sorted({float(k.split("|share=")[1].split("|")[0]) for k in entries if "|share=" in k}):
            entry = entries.get(self.calibration_key(loaded, share))
            if not isinstance(entry, dict) or not all("order" in p for p in entry.get("pairs", [None])):
                continue
            if entry.get("wanted", -1) >= wanted or len(entry["pairs"]) < entry.get("wanted", -1):
                ordered = sorted(entry["pairs"], key=lambda p: p["order"])[:wanted]
                return {**entry, "pairs": sorted(ordered, key=lambda p: p["target"]), "wanted": wanted,
                        "derived_from_share": share}
        return None

    def check_calibration(self, loaded: LoadedModel, result: dict) -> None:
        layers = loaded.num_layers
        if result["num_layers"] != layers:
            raise ValueError(f"the plan is for {result['num_layers']} layers, the model has {layers}")
        for pair in result["pairs"]:
            if not 0 <= pair["source"] < pair["target"] < layers or not isinstance(pair["cosine"], (int, float)):
                raise ValueError(f"the pair {pair} does not fit {layers} layers")
        if not all(isinstance(result[name], (int, float)) for name in ("wanted", "checked", "prompts", "seconds")):
            raise TypeError("'wanted', 'checked', 'prompts' and 'seconds' must be numbers")

    def needs_calibration(self, context) -> bool:
        return self.target_count(context_model(context, self.name).num_layers) > 0

    def compute_calibration(self, loaded: LoadedModel, progress: Progress | None) -> dict:
        """The sharing plan for this model (SmolLM2 on two CPU cores: about 50 s at the defaults, 100 s when the
        search runs through every pair): {"pairs": [{target, source, distance, cosine, order}], "wanted",
        "num_layers", "checked", "prompts", "seconds"}."""
        started = time.perf_counter()
        num_layers = loaded.num_layers
        wanted = self.target_count(num_layers)
        texts = self.calibration_set.texts()
        tail = self.check_tokens
        prefixes, tails, references = [], [], []
        sums: np.ndarray | None = None
        kinds: list[tuple] = []
        for index, text in enumerate(texts):
            report_progress(progress, 0.3 * index / len(texts), f"kvsharer: calibration prompt {index + 1}/{len(texts)}")
            ids = loaded.encode(text)
            if ids.shape[1] <= tail + 1:
                raise InputError("kvsharer: calibration prompts are too short")
            prefix = runtime.new_cache(loaded)
            with loaded.lock:
                runtime.forward_tokens(loaded, prefix, ids[:, :-tail], 0, last_only=True)
                reference = runtime.forward_tokens(loaded, shallow_cache(loaded, prefix), ids[:, -tail:],
                                                   ids.shape[1] - tail)
            means = np.stack([
                torch.cat([layer.keys[0].float().mean(dim=1).flatten(), layer.values[0].float().mean(dim=1).flatten()])
                .cpu().numpy().astype(np.float64)
                for layer in prefix.layers
            ])  # (L, 2·H_kv·d)
            sums = means if sums is None else sums + means
            kinds = [layer_kind(layer) for layer in prefix.layers]
            prefixes.append(prefix)
            tails.append((ids[:, -tail:], ids.shape[1] - tail))
            references.append(reference)
        means = sums / len(texts)
        ranked = sorted(
            ((float(np.linalg.norm(means[m] - means[l])), m, l)
             for l in range(num_layers) for m in range(l) if kinds[m] == kinds[l]),
            key=lambda item: -item[0],
        )

        def check(pairs: list[tuple[int, int]]) -> float:
            cosines = []
            for prefix, (tail_ids, start), reference in zip(prefixes, tails, references):
                cache = shallow_cache(loaded, prefix)
                apply_sharing(cache, pairs)
                logits = runtime.forward_tokens(loaded, cache, tail_ids, start)
                cosines.append(torch.nn.functional.cosine_similarity(logits, reference, dim=-1).mean().item())
            return float(np.mean(cosines))

        accepted: list[dict] = []
        targets: set[int] = set()
        sources: set[int] = set()
        checked = 0
        for rank, (distance, source, target) in enumerate(ranked):
            if len(accepted) >= wanted:
                break
            if target in targets or target in sources or source in targets:
                continue
            report_progress(progress, 0.3 + 0.7 * rank / max(len(ranked), 1),
                            f"kvsharer: checking layer {target} ← {source} ({len(accepted)}/{wanted} accepted)")
            pairs = [(a["target"], a["source"]) for a in accepted] + [(target, source)]
            with loaded.lock:
                cosine = check(pairs)
            checked += 1
            if cosine >= self.params["threshold"]:
                accepted.append({"target": target, "source": source, "distance": round(distance, 6),
                                 "cosine": round(cosine, 6), "order": len(accepted)})
                targets.add(target)
                sources.add(source)
        seconds = time.perf_counter() - started
        report_progress(progress, 1.0, f"kvsharer: {len(accepted)} of {wanted} layers share ({seconds:.1f} s)")
        return {
            "pairs": sorted(accepted, key=lambda a: a["target"]),
            "wanted": wanted,
            "num_layers": num_layers,
            "checked": checked,
            "prompts": len(texts),
            "seconds": round(seconds, 3),
        }

    def compress(self, cache, context) -> CompressionReport:
        loaded = context_model(context, self.name)
        num_layers = kvcache.layer_count(cache)
        if self.target_count(num_layers) == 0:
            return CompressionReport(layer_budgets=np.asarray(kvcache.layer_lengths(cache)),
                                     notes=["kvsharer: share rounds to 0 layers, nothing shared"])
        plan = self.calibrate(loaded, context.progress)
        if plan["num_layers"] != num_layers:
            raise InputError(f"kvsharer: the plan is for {plan['num_layers']} layers, the cache has {num_layers}")
        pairs = [(p["target"], p["source"]) for p in plan["pairs"]]
        apply_sharing(cache, pairs)
        budgets = [0 if isinstance(entry, SharedLayer) else n for entry, n in zip(cache.layers, kvcache.layer_lengths(cache))]
        notes = [
            f"kvsharer: {len(pairs)} of {num_layers} layers reuse another layer's cache "
            f"(calibrated in {plan['seconds']:.1f} s on {plan['prompts']} prompts, {plan['checked']} checks): "
            + ", ".join(f"{p['target']}←{p['source']} (cos {p['cosine']:.3f})" for p in plan["pairs"])
        ]
        if len(pairs) < plan["wanted"]:
            notes.append(f"kvsharer: only {len(pairs)} of {plan['wanted']} layers passed the cosine check "
                         f"≥ {self.params['threshold']}")
        notes += self.calibration_notes(loaded)
        return CompressionReport(layer_budgets=np.asarray(budgets), notes=notes)
