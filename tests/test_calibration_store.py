"""The calibrated-method base: memory, storage under the calibration folder, one computation per key, damaged
files computed again with a note."""

import json
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

from zigzag_viz.methods import CompressionContext, CompressionReport, calibration, parse_spec
from zigzag_viz.methods.baklava import BaKlaVa
from zigzag_viz.methods.calibration import (
    CalibratedMethod,
    CalibrationSet,
    calibration_path,
    file_lock,
    key_file,
    model_fingerprint,
    report_progress,
    write_atomically,
)
from zigzag_viz.methods.less import Less
from zigzag_viz.pipeline import cache as kvcache
from zigzag_viz.pipeline import runtime
from zigzag_viz.evaluation.prompts import passkey_prompt


class Toy(CalibratedMethod):
    """A calibrated method with a tensors file: one (2, 3) tensor per layer, filled with the layer's index."""

    name = "toy"
    summary = "test method"
    weight_fields = ("weights",)

    def calibration_key(self, loaded):
        return f"{model_fingerprint(loaded)}|toy"

    def compute_calibration(self, loaded, progress):
        report_progress(progress, 0.0, "toy: computing")
        return {"weights": [torch.full((2, 3), float(layer)) for layer in range(loaded.num_layers)],
                "layers": loaded.num_layers}

    def check_calibration(self, loaded, result):
        if len(result["weights"]) != loaded.num_layers or any(w.shape != (2, 3) for w in result["weights"]):
            raise ValueError("the weights do not fit the model")

    def compress(self, cache, context):
        return CompressionReport(np.asarray(kvcache.layer_lengths(cache)), notes=self.calibration_notes(context.loaded))


@pytest.fixture(autouse=True)
def fresh_calibration(tmp_path, monkeypatch):
    """Calibration files go to a temporary folder, BaKlaVa profiles two short prompts, counts start at zero."""
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path))
    monkeypatch.setattr(BaKlaVa, "calibration_set", CalibrationSet(prompts=2, sentences=8))
    monkeypatch.setattr(calibration, "computations", Counter())


@pytest.fixture(scope="module")
def prefilled(tiny):
    return runtime.prefill(tiny, tiny.encode(passkey_prompt(n_sentences=14, seed=8).text), window=16)


def _another_process():
    """Forget the calibrations held in memory, as a new process would start."""
    calibration.memo.clear()


def _folder_names(tiny) -> list[str]:
    return sorted(p.name for p in calibration_path(tiny, "toy").parent.iterdir())


def test_threads_asking_at_once_calibrate_once(tiny, monkeypatch):
    compute = BaKlaVa.compute_calibration

    def slow(self, loaded, progress):
        time.sleep(0.3)
        return compute(self, loaded, progress)

    monkeypatch.setattr(BaKlaVa, "compute_calibration", slow)
    start = threading.Barrier(6)
    results, heard = [None] * 6, [[] for _ in range(6)]

    def ask(index):
        start.wait()
        results[index] = parse_spec("baklava").calibrate(tiny, lambda f, m: heard[index].append(m))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calibration.computations["baklava"] == 1
    assert all(result is results[0] for result in results)
    computing = [messages for messages in heard if any("profiling prompt" in m for m in messages)]
    waiting = [messages for messages in heard if messages == ["baklava: waiting for the calibration another session "
                                                              "is running"]]
    assert len(computing) == 1 and len(waiting) == 5


def test_a_held_file_lock_makes_the_next_holder_wait(tmp_path):
    path = tmp_path / "key.lock"
    order = []
    held, release = threading.Event(), threading.Event()

    def holder():
        with file_lock(path, lambda: order.append("holder waited")):
            held.set()
            release.wait(5)
            order.append("holder done")

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    threading.Timer(0.2, release.set).start()
    with file_lock(path, lambda: order.append("second waits")):
        order.append("second holds")
    thread.join()
    assert order == ["second waits", "holder done", "second holds"]


@pytest.mark.parametrize("damage", ["truncated", "not an object", "wrong shape"])
def test_a_damaged_manifest_is_computed_again_with_a_note(tiny, prefilled, damage):
    first = parse_spec("baklava").calibrate(tiny)
    path = calibration_path(tiny, "baklava")
    text = path.read_text()
    key = parse_spec("baklava").calibration_key(tiny)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    else:
        data = json.loads(text)
        data["entries"][key] = [1, 2] if damage == "not an object" else {**first, "importance": [[0.5, 0.5]] * 3}
        path.write_text(json.dumps(data))
    _another_process()
    heard = []
    with pytest.warns(RuntimeWarning, match="baklava: the stored calibration in .* could not be used"):
        again = parse_spec("baklava").calibrate(tiny, lambda f, m: heard.append(m))
    assert calibration.computations["baklava"] == 2
    assert again["importance"] == first["importance"]
    assert "could not be used" in heard[0] and heard[-1].startswith("baklava: profiled in")
    assert json.loads(path.read_text())["entries"][key] == again  # stored whole again
    context = CompressionContext(prefilled.analysis, 0.3, loaded=tiny)
    report = parse_spec("baklava").compress(kvcache.clone(prefilled.cache), context)
    assert [n for n in report.notes if "could not be used" in n] == [heard[0]]
    later = parse_spec("baklava").compress(kvcache.clone(prefilled.cache), context)
    assert not any("could not be used" in n for n in later.notes)  # the note is shown once


@pytest.mark.parametrize("damage", ["truncated", "another key", "wrong shape"])
def test_a_damaged_weights_file_is_computed_again_with_a_note(tiny, damage):
    Toy().calibrate(tiny)
    manifest = calibration_path(tiny, "toy")
    weights = key_file(manifest, Toy().calibration_key(tiny), ".pt")
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:200])
    else:
        stored = torch.load(weights, weights_only=True)
        if damage == "another key":
            stored["key"] = "another"
        else:
            stored["weights"][1] = torch.zeros(3, 2)
        torch.save(stored, weights)
    _another_process()
    heard = []
    with pytest.warns(RuntimeWarning, match="toy: the stored calibration .* could not be used"):
        result = Toy().calibrate(tiny, lambda f, m: heard.append(m))
    assert calibration.computations["toy"] == 2 and "could not be used" in heard[0]
    assert [w[0, 0].item() for w in result["weights"]] == [0.0, 1.0, 2.0, 3.0]
    _another_process()
    read = Toy().calibrate(tiny)  # stored whole again: read without computing
    assert calibration.computations["toy"] == 2
    assert all(torch.equal(a, b) for a, b in zip(read["weights"], result["weights"]))
    assert json.loads(manifest.read_text())["entries"][Toy().calibration_key(tiny)] == {"layers": 4}


def test_a_failed_write_leaves_the_old_file_and_no_part(tmp_path):
    path = tmp_path / "store" / "result.json"
    write_atomically(path, lambda handle: handle.write(b'{"old": true}'))

    def fails_midway(handle):
        handle.write(b'{"new": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fails_midway)
    assert path.read_text() == '{"old": true}'
    assert [p.name for p in path.parent.iterdir()] == ["result.json"]


def test_weights_that_fail_midway_leave_nothing_and_the_result_is_kept_in_memory(tiny, monkeypatch):
    def fails_midway(obj, handle):
        handle.write(b"PK\x03\x04 partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fails_midway)
    with pytest.warns(RuntimeWarning, match="toy: the calibration could not be stored .* disk full"):
        result = Toy().calibrate(tiny)
    assert len(result["weights"]) == 4
    assert _folder_names(tiny) == [key_file(calibration_path(tiny, "toy"), Toy().calibration_key(tiny), ".lock").name]
    assert Toy().calibrate(tiny) is result and calibration.computations["toy"] == 1


def test_weights_without_their_manifest_entry_are_ignored(tiny, monkeypatch):
    def fails(*args):
        raise OSError("disk full")

    store_entry = calibration.store_entry
    monkeypatch.setattr(calibration, "store_entry", fails)
    with pytest.warns(RuntimeWarning, match="could not be stored"):
        Toy().calibrate(tiny)
    weights = key_file(calibration_path(tiny, "toy"), Toy().calibration_key(tiny), ".pt")
    assert weights.exists() and not calibration_path(tiny, "toy").exists()  # the manifest comes last
    monkeypatch.setattr(calibration, "store_entry", store_entry)
    monkeypatch.setattr(calibration, "computations", Counter())
    _another_process()
    heard = []
    Toy().calibrate(tiny, lambda f, m: heard.append(m))  # no entry: computed again, silently (no damage)
    assert calibration.computations["toy"] == 1 and heard == ["toy: computing"]
    assert calibration_path(tiny, "toy").exists()


def test_warm_up_reports_progress_and_later_calls_are_silent(tiny, prefilled):
    heard = []
    context = CompressionContext(prefilled.analysis, 0.3, loaded=tiny, progress=lambda f, m: heard.append((f, m)))
    method = parse_spec("baklava")
    method.warm_up(context)
    assert [m for _, m in heard][:2] == ["baklava: profiling prompt 1/2", "baklava: profiling prompt 2/2"]
    assert heard[-1][0] == 1.0 and calibration.computations["baklava"] == 1
    heard.clear()
    budgets = method.budgets(context)
    report = parse_spec("baklava").compress(kvcache.clone(prefilled.cache), context)
    assert heard == [] and calibration.computations["baklava"] == 1
    assert report.layer_budgets.tolist() == budgets.tolist()
    parse_spec("baklava").warm_up(context)  # the next row: from memory, silently
    assert heard == []


def test_warm_up_skips_rows_that_use_no_calibration(tiny, prefilled):
    heard = []
    progress = lambda f, m: heard.append(m)  # noqa: E731
    parse_spec("kvsharer[share=0]").warm_up(CompressionContext(prefilled.analysis, 0.3, loaded=tiny, progress=progress))
    less = Less()
    assert not less.needs_calibration(CompressionContext(prefilled.analysis, 1.0, loaded=tiny))
    assert less.needs_calibration(CompressionContext(prefilled.analysis, 0.3, loaded=tiny))
    less.warm_up(CompressionContext(prefilled.analysis, 1.0, loaded=tiny, progress=progress))
    assert heard == [] and not calibration.computations


def test_storage_follows_the_cache_folder_setting(tiny, tmp_path, monkeypatch):
    for folder in ("one", "two"):
        monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path / folder))
        Toy().calibrate(tiny)
        manifest = tmp_path / folder / "calibration" / "tiny" / "toy.json"
        assert calibration_path(tiny, "toy") == manifest and manifest.exists()
        assert key_file(manifest, Toy().calibration_key(tiny), ".pt").exists()
    assert calibration.computations["toy"] == 2  # memory is kept per folder too
    monkeypatch.setenv("ZIGZAG_VIZ_CACHE", str(tmp_path / "one"))
    Toy().calibrate(tiny)
    assert calibration.computations["toy"] == 2
