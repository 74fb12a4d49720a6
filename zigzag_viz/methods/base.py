"""The one interface every compression method shares, its registry, and the spec-string parser.

A spec names a method and its parameters: `zigzag`, `zigzag[rho=0.5,signal=entropy]`, `pyramid[beta=10]`.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np
import torch

from ..errors import InputError
from ..pipeline import cache as kvcache
from ..pipeline import runtime
from ..pipeline.budgets import DEFAULT_BETA, DEFAULT_RHO, average_budget, pyramid_budgets, uniform_budgets, zigzag_budgets
from ..pipeline.capture import PromptAnalysis, decoder_layers
from ..pipeline.selection import SELECTOR_NEEDS, SELECTORS, LayerInputs, keep_top


@dataclass(frozen=True)
class Parameter:
    """One tunable parameter: its type, default, and the values it accepts."""

    kind: type
    default: Any
    help: str
    choices: tuple | None = None
    low: float | None = None
    high: float | None = None
    auto: bool = False  # also accepts "auto": the method chooses the value per model (a calibration)

    def parse(self, method: str, name: str, text: Any) -> Any:
        if self.auto and str(text).strip().lower() == "auto":
            return "auto"
        try:
            value = self.kind(text)
        except (TypeError, ValueError):
            raise InputError(f"{method}: parameter '{name}' must be a {self.kind.__name__}, got {text!r:.40}") from None
        if self.choices is not None and value not in self.choices:
            raise InputError(f"{method}: parameter '{name}' must be one of {', '.join(map(str, self.choices))}, "
                             f"got {value!r:.40}")
        if value != value or self.low is not None and value < self.low or self.high is not None and value > self.high:
            raise InputError(f"{method}: parameter '{name}' must lie in [{self.low}, {self.high}], got {value}")
        return value


@dataclass
class CompressionContext:
    """What a method may use for one row: the prompt's signals, the kept fraction asked for (0 < budget ≤ 1),
    and the model (for methods that calibrate on it), with an optional progress(fraction, message) callback
    that may raise to cancel. Layer budgets are computed once per method and context (`CompressionMethod.budgets`)."""

    analysis: PromptAnalysis
    budget: float
    loaded: Any = None
    progress: Any = None
    _budgets: dict = field(default_factory=dict, repr=False)

    @property
    def avg_budget(self) -> float:
        return average_budget(self.budget, self.analysis.n_tokens, self.analysis.layer_caps)


@dataclass
class CompressionReport:
    """What a method did: tokens kept per layer (L,), the prompt positions each KV head kept in the layers it
    evicted from (`kept[layer][head]`, ascending; layers absent keep what they held) and notes for the user."""

    layer_budgets: np.ndarray
    notes: list[str] = field(default_factory=list)
    kept: dict[int, list[np.ndarray]] = field(default_factory=dict)


def prompt_positions(keep: torch.Tensor | list[torch.Tensor], held: int, n_tokens: int) -> list[np.ndarray]:
    """Indices into a layer's `held` most recent tokens, per KV head, as positions in the n-token prompt."""
    return [row.cpu().numpy().astype(np.int64) + (n_tokens - held) for row in keep]


# Order in which composed methods apply: drop tokens, then share/merge layers, then prune channels, then quantize.
STAGES = ("tokens", "layers", "channels", "bits")


class CompressionMethod(ABC):
    """A KV-cache compression method: one small class per file in this folder, registered by its `name`.

    Subclasses set `name`, `summary`, `paper`, `compresses`, `stage`, `calibration` (what it needs beyond the
    prompt) and `parameters`, and implement `compress`. The contract the runner relies on:

    - `prefill_needs`: extra records the prefill must keep for this method (e.g. {"query_energy"} for ThinK);
    - `warm_up(context)`: once-per-model work before the first prompt (calibration), reporting progress;
    - `layer_budgets(context)`: (L,) tokens kept per layer, or None for methods that do not allocate per
      layer; `budgets(context)` computes it once per row and every caller reuses it;
    - `compress(cache, context)`: shrink the cache in place and report what was kept;
    - `lossless`: True when `compress` leaves the cache as it is (full KV), so its row is the reference's.

    `compress` works on a cache whose layers are dense; it leaves dense layers behind unless `leaves_dense` is
    False (so later stages of a composition can still work on them).
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str] = ""
    compresses: ClassVar[str] = "tokens per layer"
    stage: ClassVar[str] = "tokens"
    calibration: ClassVar[str] = "none"
    leaves_dense: ClassVar[bool] = True
    lossless: ClassVar[bool] = False
    prefill_needs: ClassVar[frozenset[str]] = frozenset()
    parameters: ClassVar[dict[str, Parameter]] = {}

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            known = ", ".join(self.parameters) or "none"
            raise InputError(f"{self.name}: unknown parameter '{unknown[0]:.40}' (parameters: {known})")
        self.params = {
            key: spec.parse(self.name, key, params[key]) if key in params else spec.default
            for key, spec in self.parameters.items()
        }

    @property
    def spec(self) -> str:
        """Canonical spec string: defaults left out."""
        changed = [f"{k}={v}" for k, v in self.params.items() if v != self.parameters[k].default]
        return f"{self.name}[{','.join(changed)}]" if changed else self.name

    def warm_up(self, context: CompressionContext) -> None:
        """Once-per-model work before compressing (calibration); nothing for most methods."""

    def layer_budgets(self, context: CompressionContext) -> np.ndarray | None:
        """(L,) integer tokens kept per layer for this prompt, or None when the method does not allocate per layer.
        Raises BudgetError when the budget is impossible."""
        return None

    def budgets(self, context: CompressionContext) -> np.ndarray | None:
        """`layer_budgets`, computed once per method and context and reused by the check, the report and timing."""
        if self.spec not in context._budgets:
            context._budgets[self.spec] = self.layer_budgets(context)
        return context._budgets[self.spec]

    @abstractmethod
    def compress(self, cache, context: CompressionContext) -> CompressionReport:
        """Shrink `cache` in place after prefill."""


# Layer-budget rules a method may take as its `alloc` parameter: (analysis, B_avg tokens) → (L,) tokens kept.
ALLOCATIONS: dict[str, Callable[[PromptAnalysis, float], np.ndarray]] = {
    "uniform": lambda a, avg: uniform_budgets(a.num_layers, avg, a.n_tokens, a.window, caps=a.layer_caps),
    "zigzag": lambda a, avg: zigzag_budgets(a.layer_signal("lmba"), avg, a.n_tokens, a.window, rho=DEFAULT_RHO,
                                            caps=a.layer_caps),
    "pyramid": lambda a, avg: pyramid_budgets(a.num_layers, avg, a.n_tokens, a.window, beta=DEFAULT_BETA,
                                              caps=a.layer_caps),
}


class TokenBudgetMethod(CompressionMethod):
    """Evicts tokens per layer: a budget rule gives B_l, a selector picks which B_l tokens each KV head keeps."""

    select_parameter: ClassVar[Parameter] = Parameter(
        str, "snapkv", "within-layer selection", choices=tuple(SELECTORS)
    )
    alloc_parameter: ClassVar[Parameter] = Parameter(
        str, "uniform", "layer budgets: uniform, zigzag (LMBA) or pyramid", choices=tuple(ALLOCATIONS)
    )

    def allocated_budgets(self, context: CompressionContext) -> np.ndarray:
        """(L,) tokens per layer from the rule named by this method's `alloc` parameter."""
        return ALLOCATIONS[self.params["alloc"]](context.analysis, context.avg_budget)

    @abstractmethod
    def layer_budgets(self, context: CompressionContext) -> np.ndarray:
        """(L,) integer tokens kept per layer."""

    default_select: ClassVar[str] = "snapkv"

    @property
    def selector(self) -> str:
        return self.params.get("select", self.default_select)

    @property
    def prefill_needs(self) -> frozenset[str]:
        return SELECTOR_NEEDS.get(self.selector, frozenset())

    def scores(self, cache, layer: int, context: CompressionContext) -> torch.Tensor:
        """(H_kv, held) keep-scores of the tokens one layer's cache holds (the last `held` of the prompt)."""
        a = context.analysis
        entry = cache.layers[layer]
        keys = entry.keys
        held = keys.shape[-2]
        inputs = LayerInputs(torch.from_numpy(a.kv_scores(layer)[:, -held:]).to(keys.device), keys, entry.values,
                             n_tokens=a.n_tokens)
        if "reconstruction" in self.prefill_needs:
            if a.reconstruction is None:
                raise InputError(f"{self.spec}: this selection needs the prefill's reconstruction scores")
            inputs.reconstruction = torch.from_numpy(a.reconstruction[layer][:, -held:]).to(keys.device)
        if "window_queries" in self.prefill_needs:
            if a.window_queries is None or context.loaded is None:
                raise InputError(f"{self.spec}: this selection needs the prefill's window queries and the model")
            w = a.window_queries.shape[2]
            inputs.queries = torch.from_numpy(a.window_queries[layer]).to(keys.device)
            inputs.query_positions = torch.arange(a.n_tokens - w, a.n_tokens, device=keys.device)
            inputs.rotation = runtime.rotation(context.loaded, layer)
            attention_module = decoder_layers(context.loaded.model)[layer].self_attn
            inputs.scaling = float(getattr(attention_module, "scaling", keys.shape[-1] ** -0.5))
        return SELECTORS[self.selector](inputs)

    def compress(self, cache, context: CompressionContext) -> CompressionReport:
        budgets = self.budgets(context)
        held = kvcache.layer_lengths(cache)
        kept = {}
        for layer, budget in enumerate(budgets):
            if budget < held[layer]:
                keep = keep_top(self.scores(cache, layer, context), int(budget), context.analysis.window)
                self.evict_layer(cache, layer, keep, context)
                kept[layer] = prompt_positions(keep, held[layer], context.analysis.n_tokens)
        return CompressionReport(layer_budgets=np.asarray(budgets), kept=kept)

    def evict_layer(self, cache, layer: int, keep: torch.Tensor, context: CompressionContext) -> None:
        """Keep only tokens `keep` (H_kv, B) of one dense layer; methods that store more than the kept rows override it."""
        kvcache.evict(cache, layer, keep)


class CompositeMethod(CompressionMethod):
    """Methods on different axes applied one after another, e.g. `zigzag+kivi` (tokens, then bits)."""

    name = "composite"
    summary = "methods on different axes, applied in the order tokens → layers → channels → bits"

    def __init__(self, parts: list[CompressionMethod]):
        super().__init__()
        ordered = sorted(parts, key=lambda m: STAGES.index(m.stage))
        stages = [m.stage for m in ordered]
        if len(set(stages)) != len(stages):
            raise InputError(f"{'+'.join(m.spec for m in parts)}: combine methods on different axes ({', '.join(STAGES)})")
        for earlier in ordered[:-1]:
            if not earlier.leaves_dense:
                raise InputError(f"{earlier.name} cannot be followed by another method: its cache is no longer dense")
        self.parts = ordered
        self.prefill_needs = frozenset().union(*(part.prefill_needs for part in ordered))
        self.lossless = all(part.lossless for part in ordered)

    @property
    def spec(self) -> str:
        return "+".join(m.spec for m in self.parts)

    def warm_up(self, context: CompressionContext) -> None:
        for part in self.parts:
            part.warm_up(context)

    def layer_budgets(self, context: CompressionContext) -> np.ndarray | None:
        """The first part's per-layer budgets that has any (the token stage comes first)."""
        for part in self.parts:
            budgets = part.budgets(context)
            if budgets is not None:
                return budgets
        return None

    def compress(self, cache, context: CompressionContext) -> CompressionReport:
        reports = [part.compress(cache, context) for part in self.parts]
        token_reports = [r for part, r in zip(self.parts, reports) if part.stage == "tokens"]
        first = (token_reports or reports)[0]
        return CompressionReport(layer_budgets=first.layer_budgets, notes=[n for r in reports for n in r.notes], kept=first.kept)


METHODS: dict[str, type[CompressionMethod]] = {}


def register(cls: type[CompressionMethod]) -> type[CompressionMethod]:
    """Class decorator: make a method available by its `name`."""
    METHODS[cls.name] = cls
    return cls


_SPEC = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(?:\[(.*)\])?\s*$")


def _split_outside_brackets(text: str, separator: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text or "":
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p.strip() for p in parts]


def parse_spec(spec: str) -> CompressionMethod:
    """A method from a spec like `zigzag[rho=0.5,signal=entropy]`, or a composition like `zigzag+kivi`."""
    parts = _split_outside_brackets(spec, "+")
    if len(parts) > 1:
        if not all(parts):
            raise InputError(f"cannot read method spec {spec!r:.60}: write method+method")
        return CompositeMethod([parse_spec(part) for part in parts])
    match = _SPEC.match(spec or "")
    if not match:
        raise InputError(f"cannot read method spec {spec!r:.60}: write name or name[key=value,...]")
    name, body = match.group(1).lower(), match.group(2)
    if name not in METHODS:
        raise InputError(f"unknown method '{name:.40}': choose {', '.join(METHODS)}")
    params = {}
    for item in filter(None, (part.strip() for part in (body or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise InputError(f"{name}: write parameters as key=value, got {item!r}")
        params[key.strip()] = value.strip()
    return METHODS[name](**params)


def parse_specs(text: str) -> list[CompressionMethod]:
    """Methods from a comma-separated list; commas inside [...] belong to a method's parameters."""
    specs = [s for s in _split_outside_brackets(text, ",") if s]
    if not specs:
        raise InputError(f"no methods given: choose from {', '.join(METHODS)}")
    return [parse_spec(s) for s in specs]
