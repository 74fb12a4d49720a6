"""ZigZagKV: per-layer budgets in proportion to layer uncertainty, with a floor share ρ.

`rho=auto` and `signal=auto` choose ρ (from RHO_GRID) and the uncertainty signal (from AUTO_SIGNALS) per model:
the pair with the smallest mean KL(full ‖ compressed), teacher-forced along full KV's greedy continuation
(CALIBRATION_TOKENS tokens), over CALIBRATION_FRACTIONS kept and generated pass-key prompts whose seeds no
evaluation task or bundled example uses. The choice is stored like every calibration and reused.
"""

from __future__ import annotations

import time
from typing import ClassVar

import numpy as np
import torch

from ..evaluation.metrics import kl_per_step
from ..pipeline import cache as kvcache
from ..pipeline import runtime
from ..pipeline.budgets import DEFAULT_RHO, SIGNALS, zigzag_budgets
from ..pipeline.models import LoadedModel
from ..pipeline.selection import SELECTOR_NEEDS
from .base import CompressionContext, Parameter, TokenBudgetMethod, register
from .calibration import CalibratedMethod, CalibrationSet, Progress, context_model, model_fingerprint, report_progress

RHO_GRID = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)  # 1.0 is uniform: the calibration may find ZigZag's shares do not help
AUTO_SIGNALS = ("lmba", "entropy", "hidden")  # LMBO needs the deep capture, too slow for every prompt
CALIBRATION_FRACTIONS = (0.2, 0.35)
CALIBRATION_TOKENS = 12
CALIBRATION_WINDOW = 32


@register
class ZigZag(CalibratedMethod, TokenBudgetMethod):
    name = "zigzag"
    summary = "budgets in proportion to each layer's uncertainty (LMBA, entropy or hidden-state change)"
    paper = "ZigZagKV (arXiv 2412.09036)"
    calibration = ("only with rho=auto or signal=auto: the pair with the smallest mean KL to full KV on generated "
                   "prompts, once per model")
    parameters = {
        "rho": Parameter(float, DEFAULT_RHO, "share of the budget spread evenly (auto: chosen per model)",
                         low=0.0, high=1.0, auto=True),
        "signal": Parameter(str, "lmba", "layer uncertainty (auto: chosen per model)", choices=SIGNALS + ("auto",)),
        "tau": Parameter(float, 0.9, "attention mass that LMBA must cover", low=0.01, high=1.0),
        "select": TokenBudgetMethod.select_parameter,
    }
    calibration_set: ClassVar[CalibrationSet] = CalibrationSet(prompts=4, sentences=40, seed=7000)

    @property
    def automatic(self) -> bool:
        return "auto" in (self.params["rho"], self.params["signal"])

    def candidates(self) -> list[tuple[float, str]]:
        """The (ρ, signal) pairs the calibration compares: the grid for each parameter set to auto."""
        rhos = RHO_GRID if self.params["rho"] == "auto" else (self.params["rho"],)
        signals = AUTO_SIGNALS if self.params["signal"] == "auto" else (self.params["signal"],)
        return [(rho, signal) for rho in rhos for signal in signals]

    @property
    def calibrates(self) -> bool:
        return self.automatic

    def calibration_key(self, loaded: LoadedModel) -> str:
        grid = ";".join(f"{rho:g}/{signal}" for rho, signal in self.candidates())
        return (f"{model_fingerprint(loaded)}|{grid}|tau={self.params['tau']:g}|select={self.selector}"
                f"|kept={','.join(map(str, CALIBRATION_FRACTIONS))}|t={CALIBRATION_TOKENS}|{self.calibration_set.key}")

    def compute_calibration(self, loaded: LoadedModel, progress: Progress | None) -> dict:
        """{"rho", "signal": the chosen pair, "kl": mean KL (nats) per "ρ/signal", "prompts", "seconds"}."""
        started = time.perf_counter()
        candidates = self.candidates()
        totals = np.zeros(len(candidates))
        texts = self.calibration_set.texts()
        for index, text in enumerate(texts):
            report_progress(progress, index / len(texts),
                            f"zigzag: choosing ρ and signal, prompt {index + 1}/{len(texts)}")
            totals += self._prompt_divergences(loaded, loaded.encode(text), candidates)
        means = totals / (len(texts) * len(CALIBRATION_FRACTIONS))
        rho, signal = candidates[int(np.argmin(means))]
        seconds = time.perf_counter() - started
        report_progress(progress, 1.0, f"zigzag: ρ = {rho:g}, signal = {signal} (calibrated in {seconds:.0f} s)")
        return {"rho": rho, "signal": signal, "prompts": len(texts), "seconds": round(seconds, 3),
                "kl": {f"{r:g}/{s}": round(float(m), 6) for (r, s), m in zip(candidates, means)}}

    def _prompt_divergences(self, loaded: LoadedModel, ids: torch.Tensor, candidates) -> np.ndarray:
        """(len(candidates),) KL summed over CALIBRATION_FRACTIONS, mean over the steps of full KV's answer."""
        pre = runtime.prefill(loaded, ids, CALIBRATION_WINDOW, needs=SELECTOR_NEEDS.get(self.selector, frozenset()))
        n = pre.n_tokens
        tokens, steps = runtime.greedy_decode(loaded, kvcache.clone(pre.cache), pre.next_logits, n, CALIBRATION_TOKENS)
        reference = torch.stack(steps).float().cpu().numpy()
        sums = np.zeros(len(candidates))
        for index, (rho, signal) in enumerate(candidates):
            method = ZigZag(rho=rho, signal=signal, tau=self.params["tau"], select=self.selector)
            for fraction in CALIBRATION_FRACTIONS:
                cache = kvcache.clone(pre.cache)
                method.compress(cache, CompressionContext(pre.analysis, fraction, loaded=loaded))
                forced = runtime.teacher_forced_logits(loaded, cache, pre.next_logits, n, tokens)
                sums[index] += kl_per_step(reference, forced).mean()
        return sums

    def check_calibration(self, loaded: LoadedModel, result: dict) -> None:
        if (float(result["rho"]), result["signal"]) not in self.candidates():
            raise ValueError(f"the stored choice ρ = {result['rho']}, signal = {result['signal']} is not a candidate")

    def chosen(self, context: CompressionContext) -> tuple[float, str]:
        """(ρ, signal) for this row: the parameters, with each `auto` replaced by the model's calibrated choice."""
        rho, signal = self.params["rho"], self.params["signal"]
        if self.automatic:
            result = self.calibrate(context_model(context, self.name), context.progress)
            rho = float(result["rho"]) if rho == "auto" else rho
            signal = result["signal"] if signal == "auto" else signal
        return rho, signal

    def layer_budgets(self, context):
        a = context.analysis
        rho, signal = self.chosen(context)
        signal_values = a.layer_signal(signal, tau=self.params["tau"])
        return zigzag_budgets(signal_values, context.avg_budget, a.n_tokens, a.window, rho=rho, caps=a.layer_caps)
