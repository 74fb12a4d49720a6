"""Request bodies and reports shared by the command line and the model server, so both give the same JSON.

`AnalyzeOptions` and `CompareOptions` are the bodies of POST /analyze and POST /compare and what the CLI's
options become; `analysis_report` is what `zigzag-viz analyze --json` prints, `comparison_rows` what
`zigzag-viz compare --json` prints, and `comparison_result` adds the whole export (`--export`) for a job.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError, check_text
from ..pipeline.budgets import SIGNALS, kept_fraction

DEFAULT_METHODS = "full,zigzag,pyramid,uniform"
TOKEN_ENV = "ZIGZAG_VIZ_TOKEN"


def _whole(name: str, value: int) -> None:
    if value < 1:
        raise InputError(f"{name} must be a whole number ≥ 1, got {value}")


def _typed(name: str, value, kind):
    """`value` as the field's type (str, int, float, bool, or str | None); InputError naming the field."""
    if kind == (str | None) and value is None:
        return None
    if kind in (str, str | None) and isinstance(value, str):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    expected = {str: "text", str | None: "text or null", bool: "true or false", int: "a whole number",
                float: "a number"}[kind]
    raise InputError(f"{name} must be {expected}, got {value!r:.40}")


class _Options:
    """JSON conversion for the option dataclasses below."""

    @classmethod
    def from_json(cls, body) -> "_Options":
        """The options in a request body (a JSON object), checked; InputError naming the first bad field."""
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object")
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(body) - set(fields))
        if unknown:
            raise InputError(f"unknown field '{unknown[0]:.40}': expected {', '.join(fields)}")
        missing = [name for name, field in fields.items()
                   if field.default is dataclasses.MISSING and name not in body]
        if missing:
            raise InputError(f"missing field '{missing[0]}'")
        kinds = typing.get_type_hints(cls)
        return cls(**{name: _typed(name, value, kinds[name]) for name, value in body.items()}).check()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AnalyzeOptions(_Options):
    """POST /analyze and `zigzag-viz analyze`: the prompt text, the observation window (tokens), the kept
    fraction and LMBA's attention mass (both in (0, 1]), the signal behind the ZigZag budgets, and the extras."""

    model: str
    prompt: str
    window: int = 32
    budget: float = 0.2
    tau: float = 0.9
    signal: str = "lmba"
    heads: bool = False
    tokens: bool = False
    deep: bool = False

    def check(self) -> AnalyzeOptions:
        """These options, or InputError for the first that cannot run on any model."""
        check_text(self.model, "model name")
        check_text(self.prompt)
        _whole("window", self.window)
        kept_fraction(self.budget)
        kept_fraction(self.tau, "tau")
        if self.signal not in SIGNALS:
            raise InputError(f"signal must be one of {', '.join(SIGNALS)}, got {self.signal!r:.40}")
        if self.signal == "lmbo" and not self.deep:
            raise InputError("the lmbo signal needs the deep capture (--signal lmbo needs --deep)")
        return self


@dataclass(frozen=True)
class CompareOptions(_Options):
    """POST /compare and `zigzag-viz compare`: the prompt text, comma-separated method specs, the kept fraction
    in (0, 1], tokens to generate, the observation window (tokens), the known answer, the mode and question, and
    whether every method is brought to the kept fraction as a share of full KV's bytes (`match_bytes`)."""

    model: str
    prompt: str
    methods: str = DEFAULT_METHODS
    budget: float = 0.2
    max_new_tokens: int = 32
    window: int = 32
    answer: str | None = None
    mode: str = "aware"
    question: str | None = None
    match_bytes: bool = False

    def check(self) -> CompareOptions:
        """These options, or UserError for the first that cannot run on any model (the runner's own model-free
        checks; `request` checks the rest against the model's tokenizer and layers)."""
        from ..evaluation.runner import check_settings

        check_text(self.model, "model name")
        check_text(self.prompt)
        check_settings(self.methods, self.budget, self.mode, self.window, self.max_new_tokens)
        return self

    def request(self, runner):
        """The runner's checked request for these options (raises UserError before any forward pass)."""
        return runner.request(self.prompt, self.methods, self.budget, self.mode, self.question, self.window,
                              self.max_new_tokens, self.answer, self.match_bytes)


def analysis_report(loaded, options: AnalyzeOptions, progress=None) -> dict:
    """What `zigzag-viz analyze --json` prints: per-layer signals, budgets per rule (tokens per layer), layer
    caps and prefill seconds; per-head signals, the binned layer × token map and LMBO when asked."""
    from ..evaluation.runner import Runner
    from ..pipeline.budgets import budget_curves
    from ..pipeline.capture import LMBO_GRID, bin_columns, bin_edges, bin_texts

    pre = Runner(loaded, progress).analyze(options.prompt, options.window, deep=options.deep)
    a = pre.analysis
    signals = {name: a.layer_signal(name, tau=options.tau) for name in ("entropy", "lmba", "hidden")}
    if options.deep:
        signals["lmbo"] = a.lmbo()
    layers = []
    for i in range(a.num_layers):
        row = {"layer": i, "entropy": float(signals["entropy"][i]), "lmba": float(signals["lmba"][i]),
               "hidden_change": float(signals["hidden"][i])}
        if options.deep:
            row["lmbo"] = float(signals["lmbo"][i])
        layers.append(row)
    curves = budget_curves(signals[options.signal], options.budget, a.n_tokens, a.window, caps=a.layer_caps)
    result = {
        "model": loaded.name,
        "n_tokens": a.n_tokens,
        "layers": layers,
        "budgets": {k: [int(b) for b in v] for k, v in curves.items()},
        "signal": options.signal,
        "window": a.window,
        "layer_caps": a.layer_caps.tolist(),
        "prefill_s": round(pre.seconds, 4),
    }
    if options.heads:
        result["heads"] = {
            "entropy": a.entropy.tolist(), "entropy_norm": a.entropy_norm.tolist(),
            "lmba": a.lmba(options.tau).tolist(), "kv_group": a.kv_group.tolist(),
        }
    if options.tokens:
        edges = bin_edges(a.n_tokens)
        result["tokens"] = {
            "bin_edges": edges.tolist(),
            "bin_texts": bin_texts(loaded.token_texts(pre.input_ids[0]), edges),
            "importance": bin_columns(a.token_importance(), edges).tolist(),
            "hidden_change": bin_columns(a.hidden_change, edges, "mean").tolist(),
        }
    if options.deep:
        result["lmbo_grid"] = list(LMBO_GRID)
        result["lmbo_cos"] = a.lmbo_cos.tolist()
    return result


def comparison_rows(comparison) -> list[dict]:
    """What `zigzag-viz compare --json` prints: one JSON row per method."""
    return [row.to_json() for row in comparison.results]


def comparison_result(comparison) -> dict:
    """A finished comparison job's result: {"rows": the CLI's rows, "comparison": the whole export}."""
    return {"rows": comparison_rows(comparison), "comparison": comparison.to_json()}


def methods_listing() -> list[dict]:
    """Every registered method: name, what it compresses, summary, paper and parameters with defaults."""
    from ..methods import METHODS

    return [
        {
            "method": name,
            "compresses": cls.compresses,
            "summary": cls.summary,
            "paper": cls.paper,
            "parameters": {k: {"default": p.default, "help": p.help} for k, p in cls.parameters.items()},
        }
        for name, cls in METHODS.items()
    ]


def configured_token(token_file: str | None) -> str | None:
    """The bearer token from `token_file` (first line), else from ZIGZAG_VIZ_TOKEN, else None."""
    if token_file:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").strip().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"cannot read token file {token_file}: {getattr(exc, 'strerror', None) or exc}") from None
        if not lines or not lines[0].strip():
            raise InputError(f"the token file {token_file} is empty")
        return lines[0].strip()
    return os.environ.get(TOKEN_ENV, "").strip() or None
