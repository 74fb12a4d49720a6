"""Streamlit helpers shared by the pages. The only module of the package that imports Streamlit."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, TypeVar

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from ..pipeline.capture import PromptAnalysis
from ..evaluation.compare import Comparison, MethodResult, Reference
from ..evaluation.runner import LruCache, Runner
from ..errors import UserError
from ..methods import METHODS, CompressionMethod, Parameter, parse_specs
from ..pipeline.models import EMBEDDED_MODELS, LoadedModel, load_model

T = TypeVar("T")

CUSTOM_MODEL = "other (local folder or cached id)…"


@st.cache_resource(show_spinner="Loading the model (once per server)…", max_entries=3)
def cached_model(name: str) -> LoadedModel:
    """One model object per name for every session of this server; forward passes take its lock."""
    return load_model(name)


def model_picker(key: str = "model") -> str:
    """Model choice: the embedded models or a folder / cached id typed by the user."""
    choices = list(EMBEDDED_MODELS) + [CUSTOM_MODEL]
    choice = st.selectbox("Model", choices, key=key, help="smollm2 is the embedded SmolLM2-135M-Instruct; tiny is a 4-layer random Llama")
    if choice == CUSTOM_MODEL:
        return st.text_input("Model folder or cached Hugging Face id", key=f"{key}_path").strip()
    return choice


def _parameter_widget(method: str, name: str, param: Parameter, key: str):
    label = f"{method}: {name}"
    if param.choices is not None:
        return st.selectbox(label, param.choices, index=param.choices.index(param.default), key=key, help=param.help)
    if param.kind is float:
        return st.number_input(
            label, min_value=param.low, max_value=param.high, value=float(param.default), key=key, help=param.help,
            format="%.3g",
        )
    return st.text_input(label, value=str(param.default), key=key, help=param.help)


def method_picker(default: list[str], key: str = "methods") -> list[CompressionMethod]:
    """Pick methods by name, then tune each one's parameters; returns method instances."""
    names = st.multiselect(
        "Methods", list(METHODS), default=default, key=key,
        help="\n".join(f"- **{n}**: {cls.summary}" for n, cls in METHODS.items()),
    )
    methods = []
    with st.expander("Method parameters"):
        for name in names:
            params = {p: _parameter_widget(name, p, spec, f"{key}_{name}_{p}") for p, spec in METHODS[name].parameters.items()}
            methods.append(METHODS[name](**params))
        extra = st.text_input(
            "More specs (compositions or variants, comma-separated)", key=f"{key}_extra",
            placeholder="zigzag+kivi, uniform[select=knorm]", help="Same spec strings as the command line",
        )
        if extra.strip():
            try:
                methods.extend(parse_specs(extra))
            except UserError as exc:
                st.error(str(exc))
        if not names and not extra.strip():
            st.caption("Pick at least one method.")
    return methods


def run_safely(action: Callable[[], T], what: str) -> T | None:
    """Run `action`; show a clear message instead of a traceback when it fails, and return None."""
    try:
        return action()
    except UserError as exc:
        st.error(f"{what}: {exc}")
    except Exception as exc:  # anything else still gets a one-line message, never a traceback
        st.error(f"{what} failed unexpectedly: {type(exc).__name__}: {exc}")
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "figure"


def show_figure(fig: go.Figure, name: str) -> None:
    """Draw a figure with PNG export in its toolbar (camera) and an HTML download beside it."""
    st.plotly_chart(
        fig, width="stretch",
        config={"toImageButtonOptions": {"format": "png", "filename": _slug(name), "scale": 2}, "displaylogo": False},
    )
    st.download_button(
        f"Download {name} (HTML)", fig.to_html(include_plotlyjs="cdn", full_html=True), file_name=f"{_slug(name)}.html",
        mime="text/html", key=f"html_{_slug(name)}", on_click="ignore",
    )


def show_table(frame: pd.DataFrame, name: str) -> None:
    """A dataframe with CSV and Parquet downloads."""
    st.dataframe(frame, width="stretch", hide_index=True)
    left, right = st.columns(2)
    left.download_button(f"{name} as CSV", frame.to_csv(index=False), file_name=f"{_slug(name)}.csv",
                         mime="text/csv", key=f"csv_{_slug(name)}", on_click="ignore")
    right.download_button(f"{name} as Parquet", frame.to_parquet(index=False), file_name=f"{_slug(name)}.parquet",
                          mime="application/octet-stream", key=f"parquet_{_slug(name)}",
                          on_click="ignore")


def page_style() -> None:
    st.markdown(
        """<style>
        .zz-out {font-family: ui-monospace, monospace; font-size: 0.9rem; white-space: pre-wrap;
                 border-radius: 6px; padding: 0.6rem; background: rgba(128,128,128,0.08); min-height: 3rem;}
        .zz-head {font-weight: 600; border-left: 6px solid var(--c); padding-left: 0.5rem; margin-bottom: 0.3rem;}
        </style>""",
        unsafe_allow_html=True,
    )



# ---------------------------------------------------------------------------------------------------------
# Analysis shared by the Uncertainty and Budgets pages: one prefill per (model, prompt, window, deep), cached.


@dataclass(frozen=True)
class AnalysisResult:
    """What the pages need from one analysed prompt; small and picklable (no model, no cache tensors)."""

    model: str
    device: str
    analysis: PromptAnalysis
    token_texts: list[str]
    prefill_s: float
    num_kv_heads: int
    head_dim: int
    bytes_per_element: int
    deep: bool

    @property
    def n_tokens(self) -> int:
        return self.analysis.n_tokens


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


@st.cache_data(max_entries=12, show_spinner=False)
def cached_analysis(model_name: str, prompt: str, window: int, deep: bool = False) -> AnalysisResult:
    """Prefill `prompt` on `model_name` once and keep its signals (per server, at most 12 prompts).

    The per-layer progress bar is created and cleared inside this function, so a cache hit replays
    nothing visible; a failure raises (nothing is cached) and the caller shows the message.
    """
    loaded = cached_model(model_name)
    bar = st.progress(0.0, text="prefill")
    pre = Runner(loaded, progress=lambda fraction, message: bar.progress(fraction, text=message)).analyze(
        prompt, int(window), deep=bool(deep))
    ids = pre.input_ids
    bar.empty()
    return AnalysisResult(
        model=model_name,
        device=str(loaded.device),
        analysis=pre.analysis,
        token_texts=loaded.token_texts(ids[0].tolist()),
        prefill_s=pre.seconds,
        num_kv_heads=loaded.num_kv_heads,
        head_dim=_head_dim(loaded.config),
        bytes_per_element=loaded.dtype.itemsize,
        deep=bool(deep),
    )


def analyse(model_name: str, prompt: str, window: int, deep: bool = False) -> AnalysisResult | None:
    """`cached_analysis` inside a status box; a warning or an error (never a traceback) when it cannot run."""
    if not model_name:
        st.warning("Type a model folder or a cached model id.")
        return None
    if not prompt or not prompt.strip():
        st.warning("The prompt is empty: type some text or keep the example.")
        return None
    label = f"Analysing the prompt on {model_name}" + (" with LMBO (one compressed pass per layer and budget)" if deep else "")
    with st.status(label + "…", expanded=True) as status:
        st.write("loading the model (once per server)")
        loaded = run_safely(lambda: cached_model(model_name), "Loading the model")
        result = loaded and run_safely(lambda: cached_analysis(model_name, prompt, int(window), bool(deep)), "Analysis")
        if result:
            status.update(label=f"Analysed {result.n_tokens} tokens on {model_name} in {result.prefill_s:.2f} s",
                          state="complete", expanded=False)
        else:
            status.update(label="Stopped: see the message below", state="error", expanded=True)
    return result or None


@dataclass(frozen=True)
class ComparisonResult:
    """A finished comparison with each answer's token texts (for highlighting) and the device it ran on."""

    comparison: Comparison
    answer_tokens: dict[str, list[str]]
    device: str


@st.cache_resource(show_spinner=False)
def server_cache() -> LruCache:
    """Prefilled prompts and rows for every session of this server: a rerun with the same settings is free, a
    new budget reruns only the methods, a new method runs alone. References are shared and never modified
    (methods work on copies of their caches)."""
    return LruCache(references=4, rows=256)


def run_comparison(
    model_name: str, prompt: str, specs: tuple[str, ...], budget: float, window: int, max_new_tokens: int,
    mode: str, question: str | None, answer: str | None,
) -> ComparisonResult:
    """Full KV and every spec on one prompt through the runner, with a progress bar and each finished row listed
    as it lands; the prefill and each row come from the server's caches when they were made before."""
    loaded = cached_model(model_name)
    bar = st.progress(0.0, text="checking the settings")
    landed = st.empty()
    runner = Runner(loaded, progress=lambda fraction, message: bar.progress(fraction, text=message), cache=server_cache())
    try:
        request = runner.request(prompt, list(specs), budget, mode, question, window, max_new_tokens, answer)
        rows: list[MethodResult] = []

        def on_row(row: MethodResult) -> None:
            rows.append(row)
            landed.caption("Ready: " + " · ".join(f"{r.method} “{r.text[:40]}”" for r in rows))

        comparison = runner.compare(request, on_row)
    finally:
        bar.empty()
        landed.empty()
    tokens = {r.method: loaded.token_texts(r.token_ids) for r in comparison.results}
    return ComparisonResult(comparison, tokens, str(loaded.device))


def default_comparison_models() -> list[str]:
    """The two models the cross-model view starts with: SmolLM2 and Gemma 3 when embedded, else SmolLM2 and tiny."""
    return ["smollm2", "gemma3"] if "gemma3" in EMBEDDED_MODELS else ["smollm2", "tiny"]
