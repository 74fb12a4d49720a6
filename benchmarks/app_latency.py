"""The app as a user meets it, timed in headless Chromium (Debian `chromium`): browser time, not server time.

    .venv/bin/python benchmarks/app_latency.py --model smollm2 --samples 10

Starts `streamlit run app.py` on a free local port and measures, in one browser:
- cold_start_s: from starting the server to the home page drawn (no model is loaded for it);
- page_switch_s: median over `--samples` of a sidebar click to the next page's title (Compare, Uncertainty,
  Budgets, Runs, Benchmarks, Home in turn);
- slider_ms: on the Budgets page, after one analysis of the bundled prompt, median over `--samples` moves of the
  "Kept fraction" slider (one arrow key, a fragment rerun) until the bytes chart shows the new fraction; beside
  it full_rerun_ms, the whole page run again (a change of the sidebar's window box, timed from the key press to
  the end of the run the app records), and their ratio;
- first_row_s and run_s: on the Compare page, Run (full KV and four methods) to the first finished row on screen,
  and to every answer drawn; a second Run with one more method gives the row cache's effect (rerun_s).
Goals: cold start < 5 s, page switch < 1 s, slider < 200 ms. Writes benchmarks/results/app_latency.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "app_latency.json"
CHROMIUM = "/usr/bin/chromium"
GOALS = {"cold_start_s": 5.0, "page_switch_s": 1.0, "slider_ms": 200.0}
PAGES = [("Compare", "Full KV vs compressed KV"), ("Uncertainty", "Layer uncertainty"), ("Budgets", "Per-layer budgets"),
         ("Runs", "Stored runs"), ("Benchmarks", "Benchmarks"), ("app", "Why does a language model need")]
IDLE = "[data-testid=stApp][data-test-script-state=notRunning]"
# Counts the script runs the app finishes (its root goes from running back to notRunning) in window.zzFinishedRuns.
COUNT_RUNS = """() => {
    const app = document.querySelector('[data-testid=stApp]');
    let running = false;
    window.zzFinishedRuns = 0;
    new MutationObserver(() => {
        const state = app.getAttribute('data-test-script-state');
        if (state === 'running') running = true;
        else if (running && state === 'notRunning') { running = false; window.zzFinishedRuns += 1; }
    }).observe(app, {attributes: true, attributeFilter: ['data-test-script-state']});
}"""


# Records (performance.now(), ms) when a finished row is first listed ("Ready: …", shown while the run goes on and
# removed at its end, so it is watched rather than polled for).
WATCH_FIRST_ROW = """() => {
    window.zzWatchStartMs = performance.now();
    window.zzFirstRowMs = null;
    const observer = new MutationObserver(() => {
        if (window.zzFirstRowMs === null && document.body.innerText.includes('Ready: ')) {
            window.zzFirstRowMs = performance.now();
            observer.disconnect();
        }
    });
    observer.observe(document.body, {childList: true, subtree: true, characterData: true});
}"""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_app(port: int) -> subprocess.Popen:
    env = dict(os.environ, TQDM_DISABLE="1", TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port),
         "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_healthy(url: str, deadline_s: float = 120.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit("the app did not start")


def idle(page, timeout_ms: int = 120_000) -> None:
    page.locator(IDLE).wait_for(state="attached", timeout=timeout_ms)


def kept_share_drawn(page, fraction: float, timeout_ms: int = 60_000) -> None:
    """Until the KV-bytes bars of the Budgets page read `fraction` of full KV."""
    label = f"{round(fraction * 100)}%"
    page.wait_for_function(
        "label => [...document.querySelectorAll('[data-testid=stPlotlyChart] text.bartext')]"
        ".some(t => t.textContent === label)", arg=label, timeout=timeout_ms)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    load_at_start = os.getloadavg()[0]
    started = time.perf_counter()
    server = start_app(port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            wait_healthy(url)
            page.goto(url)
            page.get_by_text(PAGES[-1][1]).wait_for(timeout=120_000)
            cold_start = time.perf_counter() - started
            say(f"home page drawn after {cold_start:.1f} s")
            idle(page)

            switches = []
            for index in range(args.samples):
                name, title = PAGES[index % len(PAGES)]
                link = page.locator("[data-testid=stSidebarNav] a").filter(has_text=name if name != "app" else "app")
                begin = time.perf_counter()
                link.first.click()
                page.get_by_text(title).first.wait_for(timeout=60_000)
                switches.append(time.perf_counter() - begin)
                idle(page)

            say(f"page switches: median {statistics.median(switches):.2f} s")
            page.goto(f"{url}/Budgets?model={args.model}")
            page.get_by_role("button", name="Analyze").click()
            begin = time.perf_counter()
            kept_share_drawn(page, 0.2, 600_000)
            first_analysis = time.perf_counter() - begin
            idle(page)
            say(f"analysis drawn after {first_analysis:.1f} s")
            thumb = page.get_by_role("slider", name="Kept fraction")
            slider, fraction = [], 0.2
            for _ in range(args.samples):
                thumb.focus()
                fraction = round(fraction + 0.01, 2)
                begin = time.perf_counter()
                thumb.press("ArrowRight")
                kept_share_drawn(page, fraction)
                slider.append(1000 * (time.perf_counter() - begin))
                idle(page)
            say(f"slider: median {statistics.median(slider):.0f} ms")
            page.evaluate(COUNT_RUNS)
            full = []
            window = page.get_by_role("spinbutton", name="Observation window w (tokens)")
            for sample in range(args.samples):  # a sidebar widget reruns the whole page (the chart is redrawn too)
                window.fill(str(33 + sample % 2))
                finished = page.evaluate("window.zzFinishedRuns")
                begin = time.perf_counter()
                window.press("Enter")
                page.wait_for_function(f"window.zzFinishedRuns > {finished}", timeout=60_000)
                full.append(1000 * (time.perf_counter() - begin))

            say(f"whole-page rerun: median {statistics.median(full):.0f} ms")
            page.goto(f"{url}/Compare?model={args.model}&kept=0.2&window=32")
            page.get_by_role("button", name="Run").wait_for(timeout=60_000)
            idle(page)
            page.evaluate(WATCH_FIRST_ROW)
            begin = time.perf_counter()
            page.get_by_role("button", name="Run").click()
            page.wait_for_function("document.querySelectorAll('.zz-out').length >= 5 && window.zzFirstRowMs !== null",
                                   timeout=600_000)
            run = time.perf_counter() - begin
            first_row = page.evaluate("(window.zzFirstRowMs - window.zzWatchStartMs) / 1000")
            idle(page)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)

    record = {
        "benchmark": "app_latency",
        "model": args.model,
        "device": "cpu",
        "samples": args.samples,
        "cold_start_s": round(cold_start, 3),
        "page_switch_s": round(statistics.median(switches), 3),
        "page_switch_all_s": [round(v, 3) for v in switches],
        "slider_ms": round(statistics.median(slider), 1),
        "slider_all_ms": [round(v, 1) for v in slider],
        "full_rerun_ms": round(statistics.median(full), 1),
        "ratio_slider_to_full_rerun": round(statistics.median(slider) / statistics.median(full), 3),
        "first_analysis_s": round(first_analysis, 2),
        "first_row_s": round(first_row, 2),
        "run_s": round(run, 2),
        "goals": GOALS,
        "meets": {"cold_start_s": cold_start < GOALS["cold_start_s"],
                  "page_switch_s": statistics.median(switches) < GOALS["page_switch_s"],
                  "slider_ms": statistics.median(slider) < GOALS["slider_ms"]},
        "browser": "Debian chromium, headless, 1440×900",
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, load average {load_at_start:.1f} at start",
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"cold start {cold_start:.2f} s · page switch {record['page_switch_s']:.2f} s · slider {record['slider_ms']:.0f} "
          f"ms (whole-page rerun {record['full_rerun_ms']:.0f} ms: ratio {record['ratio_slider_to_full_rerun']:.2f}) · "
          f"first row {first_row:.1f} s of {run:.1f} s", file=sys.stderr)
    return record


if __name__ == "__main__":
    main()
