# segloop — two commands: `make demo` and `make test`. Every target sets itself up (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: install demo serve test bench lint clean perf-analyzer

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt review_ui/package.json review_ui/package-lock.json
	@echo "make install: a venv in $(VENV) with segloop and its dependencies (1–2 min on a fresh machine)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --progress-bar on -c constraints.txt -e '.[dev]'
	@# the tritonserver binary (Triton 2.51, python backend) bundled in nvidia-pytriton;
	@# --no-deps: its client-side deps pin numpy<2 and segloop only runs the binary
	$(PIP) install --quiet --no-deps nvidia-pytriton==0.7.0
	@# the review UI's viewer (OpenSeadragon) from npm, never copied into the repo
	@echo "make install: the review UI's OpenSeadragon (npm)"
	cd review_ui && npm ci --no-audit --no-fund --loglevel=error
	@# Debian's chromium for the browser tests (Playwright drives it; its own download
	@# cannot work here). Without root or apt the browser tests skip and say why.
	@echo "make install: Debian's chromium for the browser tests (skipped when present)"
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
	    || echo "make install: could not install chromium; browser tests will be skipped" >&2
	@# numba compiles its kernels on first use (a first job or server start: 9–17 s each);
	@# compile them once now into numba's cache, which every later run finds: make's
	@# targets, .venv/bin/segloop and the tests alike (numba's default place,
	@# __pycache__ beside the kernels' sources, or NUMBA_CACHE_DIR where one is set)
	@echo "make install: compiling numba's kernels once (≈ 40 s)"
	$(VENV)/bin/segloop warm-up || echo "make install: warm-up failed; the first job compiles the kernels instead" >&2
	touch $(STAMP)

# segments an 8192² synthetic slide, scores it, then serves it: open the printed URL
demo: install
	$(VENV)/bin/segloop demo

# the demo store again, in the review server (Ctrl-C stops it)
serve: install
	$(VENV)/bin/segloop serve demo/slide_8192x8192.zarr

test: install
	@# pytest exits 5 when it collected nothing: that is a failure, not a pass
	$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo 'make test: pytest collected no tests' >&2; exit 1; fi; exit $$rc

# large_image (the tile-serving peer) needs zarr < 3: its own venv, for `bench serve`
LI_VENV := .venv-large-image
$(LI_VENV)/.installed:
	test -x $(LI_VENV)/bin/python || $(PYTHON) -m venv $(LI_VENV)
	$(LI_VENV)/bin/python -m pip install --quiet 'large-image[tiff]==1.35.6' aiohttp
	touch $@

bench: install $(LI_VENV)/.installed
	@# wrk (Debian) measures the review server's own latency; without it that part is skipped
	command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -q wrk >/dev/null; } \
	    || echo "make bench: could not install wrk; bench serve skips its wrk runs" >&2
	$(PY) -m pytest benchmarks --benchmark-enable --benchmark-columns=min,median,ops -q
	$(VENV)/bin/segloop bench segment --size 4096 --save benchmarks/results
	$(VENV)/bin/segloop bench serve --size 4096 --vs-large-image $(LI_VENV)/bin/python \
	    --save benchmarks/results

# perf_analyzer (Triton's load generator) in its own venv: the binary inside the
# tritonclient 2.51 wheel, with Debian's libb64 and libcudart 12 from PyPI (it pins numpy<2)
PERF_VENV := .venv-perf
perf-analyzer: $(PERF_VENV)/.installed
$(PERF_VENV)/.installed:
	@echo "make perf-analyzer: tritonclient 2.51 + libcudart 12 in $(PERF_VENV)"
	test -x $(PERF_VENV)/bin/python || $(PYTHON) -m venv $(PERF_VENV)
	$(PERF_VENV)/bin/pip install --quiet tritonclient==2.51.0 nvidia-cuda-runtime-cu12 matplotlib
	ldconfig -p | grep -q libb64.so.0d || { [ "$$(id -u)" = 0 ] && apt-get install -y -q libb64-0d >/dev/null; } \
	    || { echo "make perf-analyzer: needs Debian's libb64-0d (sudo apt-get install libb64-0d)" >&2; exit 1; }
	touch $@

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(LI_VENV) $(PERF_VENV) demo .pytest_cache .numba_cache review_ui/node_modules test-artifacts
	@# numba's cache files beside the kernels' sources (.numba_cache: older checkouts)
	find server kernels -path '*/__pycache__/*.nb[ic]' -delete
