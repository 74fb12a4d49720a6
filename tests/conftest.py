import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("ZIGZAG_VIZ_DEVICE", "cpu")

import pytest
import torch

from zigzag_viz.pipeline.models import load_model


@pytest.fixture(scope="session")
def tiny():
    """The tiny random GQA Llama (4 layers, 4 query heads, 2 KV heads), float32 on the CPU."""
    return load_model("tiny", "cpu")


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct, float32 on the CPU."""
    return load_model("smollm2", "cpu")


@pytest.fixture()
def random_ids(tiny):
    generator = torch.Generator().manual_seed(1)
    return torch.randint(100, 20000, (1, 300), generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# The window capture against eager attention (test_capture, test_model_families)

def eager_reference(loaded, ids, window):
    """Entropy (L, H), mean window rows (L, H, n) and hidden change (L - 1, n) from full eager attention maps."""
    import numpy as np

    from zigzag_viz.pipeline import attention

    with attention.implementation(loaded.model, "eager"), torch.inference_mode():
        out = loaded.model(ids, output_attentions=True, output_hidden_states=True, use_cache=False)
    n = ids.shape[1]
    w = min(window, n)
    entropies, rows = [], []
    for maps in out.attentions:
        probs = maps[0, :, n - w :, :].double()  # (H, w, n)
        entropies.append(torch.special.entr(probs).sum(-1).mean(-1).numpy())
        rows.append(probs.mean(1).numpy())
    hidden = out.hidden_states
    changes = []
    for layer in range(len(out.attentions) - 1):  # the last hidden state has the final norm applied
        layer_in, layer_out = hidden[layer][0], hidden[layer + 1][0]
        changes.append((1 - torch.nn.functional.cosine_similarity(layer_in, layer_out, dim=-1)).numpy())
    return np.stack(entropies), np.stack(rows), np.stack(changes)


def _compare_with_eager(loaded, ids, window=32):
    import numpy as np

    from zigzag_viz.pipeline import runtime
    from zigzag_viz.pipeline.capture import min_budget_fraction

    analysis = runtime.prefill(loaded, ids, window).analysis
    entropy, rows, hidden = eager_reference(loaded, ids, window)
    np.testing.assert_allclose(analysis.entropy, entropy, atol=1e-4)
    np.testing.assert_allclose(analysis.attention_rows, rows, atol=1e-4)
    np.testing.assert_allclose(analysis.lmba(0.9), min_budget_fraction(rows, 0.9), atol=1e-4)
    np.testing.assert_allclose(analysis.hidden_change[: len(hidden)], hidden, atol=1e-4)
    return analysis


@pytest.fixture()
def compare_with_eager():
    """`compare_with_eager(loaded, ids, window=32)`: prefills with the window capture, asserts that its entropy,
    window attention rows, LMBA and hidden change equal those from eager attention maps, and returns the analysis."""
    return _compare_with_eager


# ---------------------------------------------------------------------------------------------------------------
# The app in headless Chromium (test_browser, test_browser_pages)

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
SERVER_TOKEN = "test-token-0123456789"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, token_file: Path, port: int | None = None) -> tuple[str, subprocess.Popen]:
    """A `zigzag-viz serve --model MODEL` process on loopback `port` (a free one by default), healthy:
    (url, process)."""
    import httpx

    port = port or _free_port()
    env = dict(os.environ, ZIGZAG_VIZ_DEVICE="cpu")
    server = subprocess.Popen(
        [sys.executable, "-m", "zigzag_viz.cli", "serve", "--model", model, "--port", str(port),
         "--token-file", str(token_file)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and server.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url, server
        except httpx.HTTPError:
            time.sleep(0.2)
    server.kill()
    pytest.fail("the server did not start:\n" + server.communicate(timeout=20)[0])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A `zigzag-viz serve --model tiny` process for one test module, with the token SERVER_TOKEN in a file:
    (url, token file, process). A test may kill it; its output never shows the token."""
    token_file = tmp_path_factory.mktemp("served") / "token"
    token_file.write_text(SERVER_TOKEN + "\n")
    url, server = start_server("tiny", token_file)
    yield url, token_file, server
    if server.poll() is None:
        server.kill()
    output = server.communicate(timeout=20)[0]
    assert SERVER_TOKEN not in output


@contextlib.contextmanager
def serving_app(**env_changes: str):
    """The app served by `streamlit run` on a free local port, with `env_changes` in its environment: its URL.

    Ready when the server prints its URL (read from its output, which is kept for the failure message) and its
    health endpoint answers; a server that exits first fails at once."""
    port = _free_port()
    env = dict(os.environ, ZIGZAG_VIZ_DEVICE="cpu", TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", **env_changes)
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    output: list[str] = []
    listening = threading.Event()

    def read_output():  # also keeps the pipe drained while the tests run
        for line in server.stdout:
            output.append(line)
            if f"URL: {url}" in line:
                listening.set()
        listening.set()  # the server exited

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    listening.wait(timeout=60)
    try:
        healthy = server.poll() is None and urllib.request.urlopen(f"{url}/_stcore/health", timeout=10).status == 200
    except OSError:
        healthy = False
    if not healthy:
        server.kill()
        server.wait(timeout=20)
        pytest.fail("streamlit did not start:\n" + "".join(output))
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)
        reader.join(timeout=20)


@pytest.fixture(scope="session")
def app_url():
    """The app with its defaults (the model in its own process), once for all browser tests."""
    with serving_app() as url:
        yield url


@pytest.fixture(scope="session")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian chromium is missing: `make test` installs it"
    with sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield instance
        instance.close()


# True once every Plotly chart on the page is drawn at its container's current width.
_PLOTS_FIT = """() => [...document.querySelectorAll('[data-testid=stPlotlyChart]')].every(chart => {
    const svg = chart.querySelector('.js-plotly-plot .main-svg');
    return svg !== null && Math.abs(svg.getBoundingClientRect().width - chart.getBoundingClientRect().width) < 1;
})"""


def finished_run(page, timeout_ms: int = 300_000) -> None:
    """Until a run's status says Done and the script has stopped (so the elements of the previous run are gone)."""
    page.get_by_text("Done: ").first.wait_for(timeout=timeout_ms)
    page.locator("[data-testid=stApp][data-test-script-state=notRunning]").wait_for(state="attached",
                                                                                   timeout=timeout_ms)


def wait_for_plots_to_fit(page, timeout_ms: int = 30_000) -> None:
    """Until every Plotly chart has been redrawn at the width its container has now (after a viewport change)."""
    page.wait_for_function(_PLOTS_FIT, timeout=timeout_ms)


def _screenshot(page, name: str) -> None:
    """The whole page into tests/artifacts/`name`: Streamlit scrolls inside its own container, so the viewport
    grows to the content first, and the charts are redrawn at their new size before the picture is taken."""
    height = page.evaluate("() => document.querySelector('[data-testid=stMain]')?.scrollHeight || 1000")
    page.set_viewport_size({"width": page.viewport_size["width"], "height": min(int(height) + 100, 6000)})
    wait_for_plots_to_fit(page)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name))


@pytest.fixture()
def screenshot():
    """`screenshot(page, name)`: the whole page, charts redrawn at the final size, saved under tests/artifacts."""
    return _screenshot
