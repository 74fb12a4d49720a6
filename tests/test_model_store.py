"""The model store: embedded GGUF models converted once into safetensors folders, and loaded from there."""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zigzag_viz.pipeline import models

FAKE_FILES = ("model.safetensors", "config.json")


@pytest.fixture()
def store_cache(tmp_path, monkeypatch):
    """A fresh, empty ZIGZAG_VIZ_CACHE with the store on."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(cache))
    monkeypatch.delenv(models.MODEL_STORE_ENV, raising=False)
    return cache


@pytest.fixture()
def source(tmp_path) -> Path:
    """A stand-in GGUF file of 3 MiB."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(os.urandom(3 * 2**20))
    return path


class FakeConversion:
    """A convert(folder) that writes a small safetensors file and a config, and counts its calls."""

    def __init__(self, seconds: float = 0.0):
        self.seconds = seconds
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, folder: Path) -> None:
        with self._lock:
            self.calls += 1
        time.sleep(self.seconds)
        save_file({"weight": torch.arange(12.0).reshape(3, 4)}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text('{"model_type": "fake"}')


def _store_entries(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "models").iterdir() if p.is_dir())


def test_model_store_switch(monkeypatch):
    for value, enabled in (("off", False), ("0", False), ("False", False), ("on", True), ("1", True)):
        monkeypatch.setenv(models.MODEL_STORE_ENV, value)
        assert models.model_store_enabled() is enabled
    monkeypatch.delenv(models.MODEL_STORE_ENV)
    assert models.model_store_enabled()


def test_fingerprint_follows_the_source_file(source):
    first = models.source_fingerprint(source)
    assert first == models.source_fingerprint(source) and len(first) == 16
    data = bytearray(source.read_bytes())
    stat = source.stat()

    data[-1] ^= 0xFF
    source.write_bytes(bytes(data))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    changed_tail = models.source_fingerprint(source)
    assert changed_tail != first

    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert models.source_fingerprint(source) == changed_tail  # a reinstall of the same file shares its conversion
    copy = source.parent / "elsewhere" / source.name
    copy.parent.mkdir()
    copy.write_bytes(source.read_bytes())
    assert models.source_fingerprint(copy) == changed_tail

    source.write_bytes(bytes(data) + b"\0")
    assert models.source_fingerprint(source) not in (first, changed_tail)


def test_fingerprint_follows_transformers_and_the_store_format(source, monkeypatch):
    first = models.source_fingerprint(source)
    monkeypatch.setattr(models, "MODEL_STORE_FORMAT", models.MODEL_STORE_FORMAT + 1)
    assert models.source_fingerprint(source) != first
    monkeypatch.undo()
    monkeypatch.setattr(models.importlib.metadata, "version", lambda name: "0.0.0")
    assert models.source_fingerprint(source) != first


def test_converts_once_and_writes_a_manifest(store_cache, source):
    convert = FakeConversion()
    folder = models.converted_folder("fake", source, convert)
    assert folder == store_cache / "models" / f"fake-{models.source_fingerprint(source)}"
    assert sorted(p.name for p in folder.iterdir()) == sorted((*FAKE_FILES, models.MANIFEST))
    assert models.converted_folder("fake", source, convert) == folder
    assert convert.calls == 1
    assert _store_entries(store_cache) == [folder.name]


def test_a_changed_source_is_converted_again_and_the_old_folder_removed(store_cache, source):
    convert = FakeConversion()
    old = models.converted_folder("fake", source, convert)
    other_kind = models.converted_folder("fake-tokenizer", source, convert)
    source.write_bytes(source.read_bytes() + b"more")
    new = models.converted_folder("fake", source, convert)
    assert new != old and convert.calls == 3
    assert _store_entries(store_cache) == sorted([new.name, other_kind.name])


@pytest.mark.parametrize("damage", ["manifest missing", "file missing", "file truncated", "header garbled",
                                    "manifest garbled"])
def test_a_damaged_folder_is_converted_again_with_a_warning(store_cache, source, damage):
    convert = FakeConversion()
    folder = models.converted_folder("fake", source, convert)
    weights = folder / "model.safetensors"
    if damage == "manifest missing":
        (folder / models.MANIFEST).unlink()
    elif damage == "file missing":
        (folder / "config.json").unlink()
    elif damage == "file truncated":
        weights.write_bytes(weights.read_bytes()[:-10])
    elif damage == "header garbled":
        weights.write_bytes(b"\xff" * weights.stat().st_size)
    else:
        (folder / models.MANIFEST).write_text("{not json")
    assert not models._is_complete(folder)
    with pytest.warns(UserWarning, match="incomplete or damaged"):
        assert models.converted_folder("fake", source, convert) == folder
    assert convert.calls == 2 and models._is_complete(folder)


def test_half_built_folders_of_a_killed_process_are_removed(store_cache, source):
    models_folder = store_cache / "models"
    models_folder.mkdir(parents=True)
    leftover = models_folder / f".fake-{models.source_fingerprint(source)}.abc123"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"partial")
    folder = models.converted_folder("fake", source, FakeConversion())
    assert not leftover.exists()
    assert _store_entries(store_cache) == [folder.name]


def test_a_failed_conversion_leaves_nothing_behind(store_cache, source):
    def failing(folder: Path) -> None:
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        models.converted_folder("fake", source, failing)
    assert _store_entries(store_cache) == []


def test_a_folder_that_appears_while_converting_wins(store_cache, source):
    """A process that wrote the target without the lock: the conversion in hand is discarded."""
    fake = FakeConversion()
    target = store_cache / "models" / f"fake-{models.source_fingerprint(source)}"

    def racing(folder: Path) -> None:
        target.mkdir()
        fake(target)
        models._write_manifest(target, source)
        fake(folder)

    assert models.converted_folder("fake", source, racing) == target
    assert models._is_complete(target)
    assert _store_entries(store_cache) == [target.name]


def test_concurrent_threads_convert_once(store_cache, source):
    convert = FakeConversion(seconds=0.5)
    start = threading.Barrier(4)
    folders = []

    def worker():
        start.wait()
        folders.append(models.converted_folder("fake", source, convert))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert convert.calls == 1
    assert len(folders) == 4 and len(set(folders)) == 1


CONVERT_IN_CHILD = """
import sys, time
from pathlib import Path
from safetensors.torch import save_file
import torch
from zigzag_viz.pipeline import models

def convert(folder):
    with open(sys.argv[2], "a") as log:
        log.write("converted\\n")
    time.sleep(1.0)
    save_file({"weight": torch.zeros(2)}, str(folder / "model.safetensors"))

print("ready", flush=True)
while not Path(sys.argv[3]).exists():
    time.sleep(0.005)
print(models.converted_folder("fake", Path(sys.argv[1]), convert))
"""


def test_concurrent_processes_convert_once(store_cache, source, tmp_path):
    log, go = tmp_path / "conversions.log", tmp_path / "go"
    children = [
        subprocess.Popen([sys.executable, "-c", CONVERT_IN_CHILD, str(source), str(log), str(go)],
                         stdout=subprocess.PIPE, text=True, env=os.environ.copy())
        for _ in range(2)
    ]
    assert [child.stdout.readline().strip() for child in children] == ["ready", "ready"]
    go.touch()
    outputs = [child.communicate(timeout=120)[0].strip() for child in children]
    assert all(child.returncode == 0 for child in children)
    assert log.read_text().splitlines() == ["converted"]
    assert outputs[0] == outputs[1] and models._is_complete(Path(outputs[0]))


def test_a_folder_that_does_not_load_is_converted_again(store_cache, source):
    convert = FakeConversion()
    reads = []

    def read(folder: Path):
        reads.append(folder)
        if len(reads) == 1:
            raise ValueError("unreadable")
        return folder.name

    def ensure() -> Path:
        return models.converted_folder("fake", source, convert)

    with pytest.warns(UserWarning, match="does not load"):
        assert models._read_converted(ensure, read) == reads[0].name
    assert convert.calls == 2


def test_the_gguf_is_read_when_the_store_is_off_or_cannot_be_written(store_cache, source, monkeypatch):
    def unwritable() -> Path:
        raise PermissionError("read-only file system")

    def read(folder: Path) -> str:
        return "converted"

    def ensure() -> Path:
        return models.converted_folder("fake", source, FakeConversion())

    assert models._from_store(ensure, read, lambda: "gguf") == "converted"
    with pytest.warns(UserWarning, match="model store cannot be used"):
        assert models._from_store(unwritable, read, lambda: "gguf") == "gguf"
    monkeypatch.setenv(models.MODEL_STORE_ENV, "off")
    assert models._from_store(ensure, read, lambda: "gguf") == "gguf"


def test_tiny_uses_the_converted_tokenizer(monkeypatch):
    """On the real default cache, which the `tiny` fixture of other tests fills anyway."""
    monkeypatch.delenv(models.MODEL_STORE_ENV, raising=False)
    _, tokenizer = models.build_tiny_model()
    folder = models.model_store_folder() / f"smollm2-tokenizer-{models.source_fingerprint(models.smollm2_gguf())}"
    assert models._is_complete(folder)
    assert tokenizer.is_fast and Path(tokenizer.name_or_path) == folder


@pytest.mark.slow
def test_converted_smollm2_matches_the_gguf(store_cache, monkeypatch):
    """Same next-token logits (float32) and the same tokenizer, read from the GGUF and from a fresh conversion."""
    cpu = torch.device("cpu")
    monkeypatch.setenv(models.MODEL_STORE_ENV, "off")
    from_gguf = models._load_smollm2(cpu)
    monkeypatch.setenv(models.MODEL_STORE_ENV, "on")
    converted = models._load_smollm2(cpu)
    assert (store_cache / "models" / f"smollm2-{models.source_fingerprint(models.smollm2_gguf())}").is_dir()
    assert converted.dtype == from_gguf.dtype == torch.float32
    assert converted.use_chat_template and converted.max_context == from_gguf.max_context
    assert converted.eos_token_ids == from_gguf.eos_token_ids

    prompts = ["What is the capital of France?", "Grüße aus Köln: naïve café, 東京タワー, Ελληνικά 🚀✓",
               "  leading spaces\nand a second line\twith a tab", "<|im_start|> looks special"]
    for prompt in prompts:
        assert converted.tokenizer(prompt)["input_ids"] == from_gguf.tokenizer(prompt)["input_ids"]
        messages = [{"role": "user", "content": prompt}]
        assert (converted.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
                == from_gguf.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        ids = converted.encode(prompt)
        assert torch.equal(ids, from_gguf.encode(prompt))
        assert converted.decode(ids[0]) == from_gguf.decode(ids[0])

    ids = converted.encode(prompts[1])
    with torch.no_grad():
        logits = [loaded.model(input_ids=ids).logits[0, -1] for loaded in (from_gguf, converted)]
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-4
    assert logits[0].argmax() == logits[1].argmax()
