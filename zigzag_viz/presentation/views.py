"""What the pages draw, made from the runner's results: small, picklable, and the same whether the model ran in
this process or on a model server (which sends them with `serving.wire`). No Streamlit here."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..evaluation.compare import Comparison
from ..pipeline.capture import PromptAnalysis
from ..pipeline.models import LoadedModel
from ..pipeline.runtime import Prefill


@dataclass(frozen=True)
class AnalysisResult:
    """One analysed prompt: its signals, token texts (n,), prefill seconds and the cache's shape per token
    (KV heads, head dim, bytes per element) for the byte estimates of the Budgets page."""

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


@dataclass(frozen=True)
class ComparisonResult:
    """A finished comparison with each answer's token texts (for highlighting) and the device it ran on."""

    comparison: Comparison
    answer_tokens: dict[str, list[str]]
    device: str


@dataclass(frozen=True)
class DeviceInfo:
    """Where a loaded model runs: device ("cpu", "cuda:0"), dtype ("float32") and, on a GPU, the bytes the
    process holds there now and the device's total (None on the CPU)."""

    model: str
    device: str
    dtype: str
    gpu_bytes_in_use: int | None = None
    gpu_bytes_total: int | None = None

    def describe(self) -> str:
        """One line for the sidebar."""
        text = f"{self.model} on {self.device} · {self.dtype}"
        if self.gpu_bytes_in_use is not None and self.gpu_bytes_total:
            text += f" · GPU memory {self.gpu_bytes_in_use / 2**30:.2f} of {self.gpu_bytes_total / 2**30:.0f} GiB"
        return text

    def to_json(self) -> dict:
        return {"device": self.device, "dtype": self.dtype, "gpu_bytes_in_use": self.gpu_bytes_in_use,
                "gpu_bytes_total": self.gpu_bytes_total}


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def analysis_result(loaded: LoadedModel, pre: Prefill, deep: bool) -> AnalysisResult:
    """The pages' view of one `Runner.analyze` result."""
    return AnalysisResult(
        model=loaded.name,
        device=str(loaded.device),
        analysis=pre.analysis,
        token_texts=loaded.token_texts(pre.input_ids[0].tolist()),
        prefill_s=pre.seconds,
        num_kv_heads=loaded.num_kv_heads,
        head_dim=_head_dim(loaded.config),
        bytes_per_element=loaded.dtype.itemsize,
        deep=bool(deep),
    )


def comparison_result(loaded: LoadedModel, comparison: Comparison) -> ComparisonResult:
    """The pages' view of one comparison: every answer's token texts added."""
    tokens = {r.method: loaded.token_texts(r.token_ids) for r in comparison.results}
    return ComparisonResult(comparison, tokens, str(loaded.device))


def device_info(loaded: LoadedModel) -> DeviceInfo:
    """Where `loaded` runs, with the GPU memory this process holds on its device when that is a GPU."""
    in_use = total = None
    if loaded.device.type == "cuda":
        in_use = int(torch.cuda.memory_allocated(loaded.device))
        total = int(torch.cuda.get_device_properties(loaded.device).total_memory)
    return DeviceInfo(loaded.name, str(loaded.device), str(loaded.dtype).removeprefix("torch."), in_use, total)


SETTING_NAMES = {"model": "the model", "prompt": "the prompt", "methods": "the methods", "budget": "the kept fraction",
                 "max_new_tokens": "max new tokens", "window": "the window", "answer": "the known answer",
                 "mode": "the setting", "question": "the question", "match_bytes": "match bytes"}


def changed_settings(made_with, now) -> list[str]:
    """What differs, in words, between the options a result was made with and the options on screen now
    (dataclasses with the fields of SETTING_NAMES); none when there is no result."""
    if made_with is None:
        return []
    return [name for field, name in SETTING_NAMES.items() if getattr(made_with, field) != getattr(now, field)]


def progress_text(message: str, fraction: float, elapsed_s: float) -> str:
    """A progress line: the message, seconds elapsed and, once a tenth is done, an estimate of the seconds left
    (elapsed scaled by what remains, assuming the rest goes at the same pace)."""
    text = f"{message} · {elapsed_s:.0f} s elapsed"
    if 0.1 <= fraction < 1.0:
        text += f" · about {elapsed_s * (1 - fraction) / fraction:.0f} s left"
    return text
