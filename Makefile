# segloop — two commands: `make demo` and `make test`. Every target sets itself up (idempotent).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: install demo test bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt review_ui/package.json review_ui/package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -c constraints.txt -e '.[dev]'
	@# the tritonserver binary (Triton 2.51, python backend) bundled in nvidia-pytriton;
	@# --no-deps: its client-side deps pin numpy<2 and segloop only runs the binary
	$(PIP) install --quiet --no-deps nvidia-pytriton==0.7.0
	@# the review UI's viewer (OpenSeadragon) from npm, never copied into the repo
	cd review_ui && npm ci --no-audit --no-fund --loglevel=error
	@# Debian's chromium for the browser tests (Playwright drives it; its own download
	@# cannot work here). Without root or apt the browser tests skip and say why.
	command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; } \
	    || echo "make install: could not install chromium; browser tests will be skipped" >&2
	touch $(STAMP)

demo: install
	$(VENV)/bin/segloop demo

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

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) $(LI_VENV) demo .pytest_cache .numba_cache review_ui/node_modules test-artifacts
