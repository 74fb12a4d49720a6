"""Streamlit helpers shared by the pages. The only module of the package that imports Streamlit."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable, TypeVar

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from ..errors import UserError
from ..failures import unexpected
from ..evaluation import retention
from ..evaluation.runner import LruCache
from ..evaluation.store import RunStore
from ..methods import METHODS, CompressionMethod, Parameter, parse_specs
from ..pipeline.models import EMBEDDED_MODELS, LoadedModel, load_model
from ..serving.api import TOKEN_ENV, CompareOptions
from . import bundled, links, story
from .backends import Backend, InProcess, Remote, remote
from .views import AnalysisResult, ComparisonResult, progress_text

T = TypeVar("T")

CUSTOM_MODEL = "other (local folder or cached id)…"
BACKEND_ENV = "ZIGZAG_VIZ_BACKEND"
IN_PROCESS, SERVER = "this process", "model server"


@st.cache_resource(show_spinner="Loading the model (once per server)…", max_entries=3)
def cached_model(name: str) -> LoadedModel:
    """One model object per name for every session of this server; forward passes take its lock."""
    return load_model(name)


@st.cache_resource(show_spinner=False)
def server_cache() -> LruCache:
    """Prefilled prompts and rows for every session of this server: a rerun with the same settings is free, a
    new budget reruns only the methods, a new method runs alone. References are shared and never modified
    (methods work on copies of their caches)."""
    return LruCache(references=4, rows=256)


@st.cache_resource(show_spinner=False)
def in_process_backend() -> InProcess:
    """Models in this Streamlit server, loaded once each and shared by every session."""
    return InProcess(cached_model, server_cache())


@st.cache_resource(show_spinner=False, max_entries=8)
def remote_backend(url: str, token: str) -> Remote:
    """One client per (server URL, token) for every session; UserError (nothing kept) when unusable."""
    return remote(url, token)


def _remember(key: str) -> None:
    st.session_state[f"_{key}"] = st.session_state[key]


def _remembered(key: str, default) -> None:
    """Give the widget `key` its last value from any page, before it is drawn: a widget on another page is
    another widget, which would start from its own default. The widget's `on_change=_remember` keeps the value
    (callbacks run before the page does)."""
    st.session_state.setdefault(f"_{key}", default)
    st.session_state[key] = st.session_state[f"_{key}"]


SHARED_DEFAULTS = {"model": "smollm2", "kept_fraction": 0.2, "window": 32, "mode": "aware", "tau": 0.9}


def shared(widget: Callable[..., T], *args, key: str, **kwargs) -> T:
    """`widget(*args, key=key, **kwargs)` (a Streamlit widget function, given no `value`) whose value every page
    shares (model, kept fraction, window, mode, τ): the same default everywhere (SHARED_DEFAULTS) and the last
    value set on any page."""
    _remembered(key, SHARED_DEFAULTS[key])
    return widget(*args, key=key, on_change=_remember, args=(key,), **kwargs)


def shared_value(key: str):
    """The shared setting `key` as last set on any page (its default before)."""
    return st.session_state.get(f"_{key}", SHARED_DEFAULTS[key])


def backend_picker() -> Backend | None:
    """Sidebar: where the model runs (this process, or a model server by URL and token, from ZIGZAG_VIZ_BACKEND
    and ZIGZAG_VIZ_TOKEN by default) and on what device; None with a one-line warning when the server cannot be
    used."""
    env_url = os.environ.get(BACKEND_ENV, "").strip()
    _remembered("backend_kind", SERVER if env_url else IN_PROCESS)
    _remembered("backend_url", env_url)
    _remembered("backend_token", "")  # ZIGZAG_VIZ_TOKEN stays on the server: it is never put in a widget
    kind = st.radio("Backend", [IN_PROCESS, SERVER], key="backend_kind", horizontal=True,
                    on_change=_remember, args=("backend_kind",),
                    help="A model server is `zigzag-viz serve` on a GPU machine, reached by URL and token")
    if kind == IN_PROCESS:
        backend = in_process_backend()
        devices = backend.devices()
        st.caption(" · ".join(d.describe() for d in devices) or "The model loads on first use, here.")
        return backend
    url = st.text_input("Server URL", key="backend_url", placeholder="http://127.0.0.1:8765",
                        on_change=_remember, args=("backend_url",)).strip()
    env_token = os.environ.get(TOKEN_ENV, "").strip()
    token = st.text_input("Token", key="backend_token", type="password", on_change=_remember, args=("backend_token",),
                          placeholder="from ZIGZAG_VIZ_TOKEN" if env_token else "",
                          help="Printed by `zigzag-viz serve`, or its --token-file").strip() or env_token
    try:
        backend = remote_backend(url, token)
        devices = backend.devices()
    except UserError as exc:
        st.warning(str(exc))
        return None
    st.caption(" · ".join(d.describe() for d in devices))
    return backend


def model_names(backend: Backend | None) -> list[str]:
    """The models a backend can run without typing a path: the embedded ones here, the loaded ones on a server
    (none, with a one-line error, when the server cannot be asked)."""
    if backend is None:
        return []
    if backend.accepts_any_model:
        return list(EMBEDDED_MODELS)
    return run_safely(lambda: [d.model for d in backend.devices()], "The model server") or []


def model_picker(backend: Backend | None, key: str = "model") -> str:
    """Model choice: the embedded models or a folder / cached id typed by the user here, the server's models
    on a model server ("" when there is no usable backend)."""
    if backend is None:
        return ""
    if not backend.accepts_any_model:
        names = model_names(backend)
        if not names:
            return ""
        return st.selectbox("Model", names, key=f"{key}_served", help="The models this server has loaded")
    choices = list(EMBEDDED_MODELS) + [CUSTOM_MODEL]
    choice = shared(st.selectbox, "Model", choices, key=key,
                    help="smollm2 is the embedded SmolLM2-135M-Instruct; tiny is a 4-layer random Llama")
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


def method_picker(default: list[str], key: str = "methods") -> list[CompressionMethod] | None:
    """Pick methods by name, then tune each one's parameters; returns method instances, or None (with the
    message shown) while a typed spec cannot be read, so that a run never goes on without it."""
    names = st.multiselect(
        "Methods", list(METHODS), default=None if key in st.session_state else default, key=key,
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
                st.error(f"More specs: {exc}")
                return None
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
        st.error(unexpected(exc, what))
    return None


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "figure"


def show_figure(fig: go.Figure, name: str) -> None:
    """Draw a figure with PNG export in its toolbar (camera) and an HTML download beside it: one file with
    plotly.js inside, so it opens offline (made only when the button is pressed)."""
    st.plotly_chart(
        fig, width="stretch",
        config={"toImageButtonOptions": {"format": "png", "filename": _slug(name), "scale": 2}, "displaylogo": False},
    )
    st.download_button(
        f"Download {name} (HTML)", lambda: fig.to_html(include_plotlyjs=True, full_html=True),
        file_name=f"{_slug(name)}.html", mime="text/html", key=f"html_{_slug(name)}", on_click="ignore",
    )


def show_table(frame: pd.DataFrame, name: str, columns: dict[str, tuple[str, str | None]] | None = None) -> None:
    """A dataframe and CSV and Parquet downloads; `columns` maps a column to (help shown on hovering its header,
    number format: a printf format or "percent", or None)."""
    config = {}
    for column, (text, number_format) in (columns or {}).items():
        if column in frame:
            config[column] = (st.column_config.NumberColumn(help=text, format=number_format) if number_format
                              else st.column_config.Column(help=text))
    st.dataframe(frame, width="stretch", hide_index=True, column_config=config or None)
    left, right = st.columns(2)
    left.download_button(f"{name} as CSV", lambda: frame.to_csv(index=False), file_name=f"{_slug(name)}.csv",
                         mime="text/csv", key=f"csv_{_slug(name)}", on_click="ignore")
    right.download_button(f"{name} as Parquet", lambda: frame.to_parquet(index=False),
                          file_name=f"{_slug(name)}.parquet", mime="application/octet-stream",
                          key=f"parquet_{_slug(name)}", on_click="ignore")


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
# Runs shared by the pages: analyses (Uncertainty, Budgets) and comparisons (Compare), on either backend.


def _shown_on(bar, since: float | None = None):
    """A progress callback drawing on the Streamlit progress `bar` (fractions clipped to [0, 1]); with `since` (a
    time.monotonic() reading) the text adds the seconds elapsed and an estimate of those left."""

    def show(fraction: float, message: str) -> None:
        fraction = min(max(fraction, 0.0), 1.0)
        bar.progress(fraction, text=message if since is None else
                     progress_text(message, fraction, time.monotonic() - since))

    return show


@st.cache_data(max_entries=12, show_spinner=False)
def cached_analysis(_backend: Backend, where: str, model_name: str, prompt: str, window: int,
                    deep: bool = False) -> AnalysisResult:
    """Prefill `prompt` on `model_name` once per backend (`where`) and keep its signals (at most 12 prompts).

    The progress bar is created and cleared inside this function, so a cache hit replays nothing visible; a
    failure raises (nothing is cached) and the caller shows the message.
    """
    bar = st.progress(0.0, text="prefill")
    result = _backend.analysis(model_name, prompt, int(window), bool(deep), _shown_on(bar))
    bar.empty()
    return result


def analyse(backend: Backend | None, model_name: str, prompt: str, window: int,
            deep: bool = False) -> AnalysisResult | None:
    """`cached_analysis` inside a status box; a warning or an error (never a traceback) when it cannot run."""
    if backend is None:
        st.warning("Pick a backend that works in the sidebar first.")
        return None
    if not model_name:
        st.warning("Type a model folder or a cached model id.")
        return None
    if not prompt or not prompt.strip():
        st.warning("The prompt is empty: type some text or keep the example.")
        return None
    label = f"Analysing the prompt on {model_name}" + (" with LMBO (one compressed pass per layer and budget)" if deep else "")
    with st.status(label + "…", expanded=True) as status:
        st.write(f"model in {backend.where}" + (" (loaded once per server)" if backend.accepts_any_model else ""))
        result = run_safely(lambda: cached_analysis(backend, backend.where, model_name, prompt, int(window), bool(deep)),
                            "Analysis")
        if result:
            status.update(label=f"Analysed {result.n_tokens} tokens on {model_name} in {result.prefill_s:.2f} s",
                          state="complete", expanded=False)
        else:
            status.update(label="Stopped: see the message below", state="error", expanded=True)
    return result or None


def run_comparison(backend: Backend, options: CompareOptions) -> ComparisonResult:
    """Full KV and every method of `options` through the backend, with a progress bar, a Cancel button and
    each finished row listed as it lands; here, the prefill and each row come from the server's caches when they
    were made before. Pressing Cancel stops the run (and the server's job) at its next progress report."""
    st.button("Cancel", key="cancel_run", help="Stop this run; the results already shown stay")
    bar = st.progress(0.0, text="checking the settings")
    landed = st.empty()
    rows: list[str] = []

    def on_row(method: str, text: str) -> None:
        rows.append(f"{method} “{text[:40]}”")
        landed.caption("Ready: " + " · ".join(rows))

    try:
        return backend.comparison(options, _shown_on(bar, time.monotonic()), on_row)
    finally:
        bar.empty()
        landed.empty()


def was_cancelled() -> bool:
    """True on the rerun that the Cancel button of `run_comparison` started."""
    return bool(st.session_state.get("cancel_run"))


def default_comparison_models() -> list[str]:
    """The two models the cross-model view starts with: SmolLM2 and Gemma 3 when embedded, else SmolLM2 and tiny."""
    return ["smollm2", "gemma3"] if "gemma3" in EMBEDDED_MODELS else ["smollm2", "tiny"]


# ---------------------------------------------------------------------------------------------------------
# Stored runs (the Runs page).


@st.cache_data(max_entries=8, show_spinner=False)
def _stored_rows(folder: str, version: tuple) -> pd.DataFrame:
    return RunStore(Path(folder)).frame()


def runs_root() -> Path:
    """Where runs are stored: ZIGZAG_VIZ_RUNS, else runs/ in the working folder."""
    return Path(os.environ.get("ZIGZAG_VIZ_RUNS", "runs"))


def run_rows(folder: Path) -> tuple[dict, pd.DataFrame]:
    """A run's manifest and rows, read again only when the run changed (its manifest's time or its shards)."""
    store = RunStore(folder)
    manifest = store.manifest()
    return manifest, _stored_rows(str(folder), (manifest.get("updated"), tuple(p.name for p in store.shards())))


# ZigZag calibrated per model (the Budgets page).

AUTO_ZIGZAG = "zigzag[rho=auto,signal=auto]"


def stored_zigzag_choice(backend: Backend | None, model_name: str) -> dict | None:
    """The (ρ, signal) calibrated for this in-process model when it was computed before and the model is loaded
    (never computes, never loads), else None."""
    if not isinstance(backend, InProcess) or model_name not in backend.loaded:
        return None
    return parse_specs(AUTO_ZIGZAG)[0].stored_result(backend.loaded[model_name])


def calibrate_zigzag(backend: Backend | None, model_name: str) -> dict | None:
    """Choose ρ and signal for this in-process model (smallest mean KL to full KV), inside a status box."""
    if not isinstance(backend, InProcess):
        st.warning("Calibration runs on models in this process: pick the in-process backend in the sidebar.")
        return None
    with st.status(f"Choosing ρ and signal for {model_name}…", expanded=True) as status:
        bar = st.progress(0.0, text="loading the model")
        method = parse_specs(AUTO_ZIGZAG)[0]
        result = run_safely(lambda: method.calibrate(cached_model(model_name), _shown_on(bar)), "Calibration")
        bar.empty()
        status.update(label=f"Calibrated {model_name}" if result else "Stopped: see the message below",
                      state="complete" if result else "error", expanded=not result)
    return result


# Why an allocation helps or hurts (the Uncertainty page).

def explain_allocation(backend: Backend | None, model_name: str, fraction: float, count: int, mode: str,
                       window: int, methods: str = "zigzag,uniform") -> pd.DataFrame | None:
    """Full KV and `methods` on `count` generated pass-key prompts through the backend, with progress: the mean
    share of the answer each method kept per layer (`retention.mean_retention`), or None when it cannot run."""
    if backend is None or not model_name:
        st.warning("Pick a backend and a model in the sidebar first.")
        return None
    bar = st.progress(0.0, text="generating the prompts")
    tables = []
    try:
        for index, prompt in enumerate(retention.explanation_prompts(int(count))):
            options = CompareOptions(model_name, prompt.text, f"full,{methods}", float(fraction), 8, int(window),
                                     answer=prompt.answers[0], mode=mode)

            def report(done: float, message: str, index=index) -> None:
                bar.progress(min(max((index + done) / count, 0.0), 1.0), text=f"prompt {index + 1} of {count}: {message}")

            shown = run_safely(lambda: backend.comparison(options, report, lambda *_: None), f"Prompt {index + 1}")
            if shown is None:
                return None
            table = retention.answer_retention(shown.comparison)
            tables.append(table[table["method"] != "full"])  # full KV keeps all of it everywhere
    finally:
        bar.empty()
    return retention.mean_retention(tables)


# Links that reproduce a view.

SHARED_DOMAINS = {"model": lambda v: v in EMBEDDED_MODELS, "kept_fraction": lambda v: 0.05 <= v <= 1.0,
                  "window": lambda v: 1 <= v <= 4096, "mode": lambda v: v in ("aware", "context"),
                  "tau": lambda v: 0.5 <= v <= 0.99}


def restore_from_link(page: str) -> dict:
    """On a session's first run of `page`, the settings in the URL (`links.read_params`): the shared ones that fit
    their widgets become the widgets' values; the rest is returned for the page ({} on later runs)."""
    flag = f"_link_read_{page}"
    if st.session_state.get(flag):
        return {}
    st.session_state[flag] = True
    values = links.read_params(st.query_params.to_dict())
    restore_shared(values)
    return values


def restore_shared(values: dict) -> None:
    """Give the shared settings in `values` (by widget key) that fit their widgets to every page."""
    for key, fits in SHARED_DOMAINS.items():
        if key in values and fits(values[key]):
            st.session_state[f"_{key}"] = values[key]


def share_in_link(params: dict[str, str] | None = None) -> None:
    """Write the shared settings (and a page's own `params`) into the URL, so that the address reproduces the view
    (the presentation step included)."""
    shared_values = {key: st.session_state.get(f"_{key}") for key in SHARED_DEFAULTS}
    step = {"present": "1", "step": st.session_state["_present_step"]} if st.session_state.get("_present") else {}
    st.query_params.from_dict({**links.shared_params(shared_values), **(params or {}), **step})


# Presentation mode: large type, controls hidden, Back / Next through the story's steps.

PRESENT_STYLE = """<style>
[data-testid="stAppViewContainer"] {font-size: 1.3rem;}
[data-testid="stMainBlockContainer"] {padding-top: 1.5rem;}
[data-testid="stAppViewContainer"] p, [data-testid="stAppViewContainer"] li {font-size: 1.3rem;}
[data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"], [data-testid="stExpandSidebarButton"],
[data-testid="stHeader"], h1 {display: none !important;}
[data-testid="stElementContainer"]:has([data-testid="stTextArea"], [data-testid="stTextInput"],
  [data-testid="stNumberInput"], [data-testid="stSlider"], [data-testid="stSelectbox"], [data-testid="stMultiSelect"],
  [data-testid="stRadio"], [data-testid="stCheckbox"], [data-testid="stButton"], [data-testid="stDownloadButton"],
  [data-testid="stAlert"]), [data-testid="stExpander"], [data-testid="stElementToolbar"] {display: none !important;}
.zz-step {font-size: 1rem; letter-spacing: 0.08em; text-transform: uppercase; opacity: 0.7;}
.zz-step-title {font-size: 2.6rem; font-weight: 700; line-height: 1.15; margin: 0.2rem 0 0.6rem;}
</style>"""


def presenting(page_steps: tuple[str, ...]) -> str | None:
    """The story step this page shows in presentation mode (`?present=1`, kept for the session until
    `?present=0`), after drawing the large-type style, the step's title and sentence and the Back / Next links;
    None outside presentation mode. `page_steps`: the keys of story.STORY this page can show."""
    present = st.query_params.get("present")
    if present in ("0", "1"):
        st.session_state["_present"] = present == "1"
    if not st.session_state.get("_present"):
        return None
    index = story.step_index(st.query_params.get("step"), page_steps)
    step = story.STORY[index]
    st.session_state["_present_step"] = step.key
    st.markdown(PRESENT_STYLE, unsafe_allow_html=True)
    st.markdown(f"<div class='zz-step'>Step {index + 1} of {len(story.STORY)}</div>"
                f"<div class='zz-step-title'>{step.title}</div>", unsafe_allow_html=True)
    st.markdown(step.says)
    back, forward, leave = st.columns([1, 1, 2])
    if index > 0:
        before = story.STORY[index - 1]
        back.page_link(before.page, label="← Back", help=before.title, query_params={"present": "1", "step": before.key})
    if index + 1 < len(story.STORY):
        after = story.STORY[index + 1]
        forward.page_link(after.page, label="Next →", help=after.title, query_params={"present": "1", "step": after.key})
    leave.page_link(step.page, label="Leave presentation mode", query_params={"present": "0"})
    return step.key


# Bundled results (every page opens populated).

def bundled_note(made: dict) -> None:
    """Say that what is shown is bundled, how it was made, and how to get one's own."""
    st.info(f"Bundled result: {made['model']} on {made['device']}, made {made['date']} with the default settings "
            "(nothing has run here yet). Change anything and press the button to compute your own.")


def analysis_or_bundled(key: str, model_name: str, prompt: str, window: int) -> AnalysisResult | None:
    """The analysis the page holds under `key`, else the bundled one for these settings (noted as such), else None."""
    result = st.session_state.get(key)
    if result is not None:
        return result
    found = bundled.bundled_analysis(model_name, prompt, int(window))
    if found is None:
        return None
    made, result = found
    bundled_note(made)
    return result
