"""Links that reproduce a view: the pages' settings as URL query parameters, and back (no Streamlit here).

    params = compare_params(options, source="passkey in varied prose", shown=True)   # → st.query_params
    values = read_params(params)                                                    # → widget values

Shared settings travel as model, kept, window, mode and tau; the Compare page adds its methods (spec strings),
max new tokens, match=1 when every method is brought to equal bytes, the prompt (a bundled example by name, or
`text-<hash>` of a prompt stored once under the cache folder with its question and answer), run=1 when the link
should show results, and saved=NAME when they are a comparison saved in the run store (opened from there, not
computed). Anything unreadable in a link is left out, never an error: the page then starts from its defaults.
"""

from __future__ import annotations

import hashlib
import json
import math

from ..paths import cache_folder

STORED = "text-"
SHARED = {"model": ("model", str), "kept": ("kept_fraction", float), "window": ("window", int), "mode": ("mode", str),
          "tau": ("tau", float)}


def store_prompt(prompt: str, question: str | None, answer: str | None) -> str:
    """Keep a typed prompt (with its question and answer) under cache_folder()/prompts/ and return its link key."""
    record = {"prompt": prompt, "question": question or "", "answer": answer or ""}
    data = json.dumps(record, sort_keys=True, ensure_ascii=False)
    key = STORED + hashlib.sha256(data.encode("utf-8")).hexdigest()[:20]
    folder = cache_folder() / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{key}.json"
    if not path.exists():
        temporary = path.with_suffix(".tmp")
        temporary.write_text(data, encoding="utf-8")
        temporary.replace(path)
    return key


def stored_prompt(key: str) -> dict | None:
    """The prompt, question and answer stored under a link key, or None when there is none (or it is damaged)."""
    if not key.startswith(STORED) or not all(c.isalnum() or c == "-" for c in key) or len(key) > 64:
        return None
    try:
        record = json.loads((cache_folder() / "prompts" / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("prompt", "question", "answer")):
        return None
    return record


def shared_params(values: dict) -> dict[str, str]:
    """Query parameters of the shared settings (`values` by widget key: model, kept_fraction, window, mode, tau)."""
    return {name: str(values[key]) for name, (key, _) in SHARED.items() if values.get(key) not in (None, "")}


def compare_params(options, source: str, bundled: bool, shown: bool, saved: str | None = None) -> dict[str, str]:
    """The Compare page's link: shared settings, methods, max new tokens, the prompt (the bundled example's name,
    or a stored prompt's key), run=1 when results are on screen, and the saved comparison they come from."""
    params = shared_params({"model": options.model, "kept_fraction": options.budget, "window": options.window,
                            "mode": options.mode})
    params.update(methods=options.methods, tokens=str(options.max_new_tokens))
    if options.match_bytes:
        params["match"] = "1"
    params["prompt"] = source if bundled else store_prompt(options.prompt, options.question, options.answer)
    if shown:
        params["run"] = "1"
    if saved:
        params["saved"] = saved
    return params


def split_methods(text: str) -> tuple[list[str], str]:
    """A link's methods as (names the picker holds, the other specs comma-joined: variants and compositions);
    ([], "") when the specs cannot be read."""
    from ..errors import UserError
    from ..methods import METHODS, parse_specs

    try:
        specs = list(dict.fromkeys(method.spec for method in parse_specs(text)))
    except UserError:
        return [], ""
    return [s for s in specs if s in METHODS], ", ".join(s for s in specs if s not in METHODS)


def _number(kind, text: str):
    value = kind(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(text)
    return value


def read_params(params: dict[str, str]) -> dict:
    """Widget values by key from a link's query parameters: the shared settings that parse, `methods` (spec
    string), `max_new_tokens`, `match_bytes`, `prompt` (a bundled name or a stored record), `saved` (a run name,
    checked where it is opened) and `run`."""
    values = {}
    for name, (key, kind) in SHARED.items():
        if name in params:
            try:
                values[key] = _number(kind, params[name]) if kind is not str else params[name]
            except ValueError:
                continue
    if params.get("methods"):
        values["methods"] = params["methods"]
    if params.get("tokens", "").isdigit():
        values["max_new_tokens"] = int(params["tokens"])
    if params.get("match") in ("0", "1"):
        values["match_bytes"] = params["match"] == "1"
    if params.get("prompt"):
        values["prompt"] = stored_prompt(params["prompt"]) or params["prompt"]
    if params.get("saved"):
        values["saved"] = params["saved"]
    values["run"] = params.get("run") == "1"
    return values
