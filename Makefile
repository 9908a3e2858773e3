# koala: `make demo` runs the main job on the embedded default, `make test` runs the tests, `make docs` builds the site.
# Both create .venv/ on first use; nothing is installed outside it (assets are cached under $KOALA_CACHE).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.koala-installed

.PHONY: setup test demo docs bench bench-llamacpp clean

setup: $(STAMP)

# torch first, from this machine's CPU build: letting another package pull torch in downloads a multi-GB CUDA build.
# uv (from PyPI) installs it from the wheel in pip's find-links folder where there is one (in seconds where pip
# takes half a minute), otherwise pip installs torch as pip's own configuration finds it. Then uv installs the rest,
# downloads in parallel; the torch already installed satisfies the project's range, so uv keeps it.
# --compile-bytecode: uv, unlike pip, writes no .pyc files, and where PYTHONDONTWRITEBYTECODE is set no process ever
# would, so every process the tests and flows start would compile torch, transformers, Prefect and MLflow from source
# again (seconds each).
TORCH_VERSION := 2.13.0
PYTAG := $(shell $(PY) -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
TORCH_WHEEL := $(firstword $(wildcard $(addsuffix /torch-$(TORCH_VERSION)+cpu-$(PYTAG)-*_$(shell uname -m).whl,\
	$(PIP_FIND_LINKS))))
UV := $(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q uv
	$(if $(TORCH_WHEEL),$(UV) '$(TORCH_WHEEL)',$(BIN)/python -m pip install -q torch==$(TORCH_VERSION))
	$(UV) -e '.[dev]'
	touch $(STAMP)

# The serving formats' own loaders, for the export round trips (tests/koala/export): each in a folder of its own,
# without dependencies, beside the venv (speculators 0.4.0.1 needs transformers 4.x, run in a subprocess; 0.9.0, the
# release vLLM reads EAGLE-3 speculators with, runs on the venv's own packages plus the two it imports at load;
# SpecForge 0.2.0, whose LlamaForCausalLMEagle3 is SGLang's EAGLE-3 layout, imports with the venv's packages alone).
OVERLAYS := $(VENV)/overlays
OVERLAY := $(UV) --no-deps --target
$(OVERLAYS)/.installed: Makefile | $(STAMP)
	$(OVERLAY) $(OVERLAYS)/speculators speculators==0.4.0.1 loguru==0.7.3 transformers==4.57.6 huggingface_hub==0.36.2 \
		tokenizers==0.22.2
	$(OVERLAY) $(OVERLAYS)/speculators-0.9 speculators==0.9.0 openai==3.63.0 hs-connectors==0.9.0 loguru==0.7.3
	$(OVERLAY) $(OVERLAYS)/medusa medusa-llm==0.1
	$(OVERLAY) $(OVERLAYS)/specforge specforge==0.2.0
	touch $@

# One pytest worker per logical core (pytest-xdist), a test file per worker at a time; tests/conftest.py gives each
# worker and the processes it starts their share of the cores' threads. The ten slowest tests are listed at the end:
# the suite is kept within 10 minutes on a fresh clone of a 2-core machine, and they are where to make room.
test: setup $(OVERLAYS)/.installed
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/python -m pytest -q -p no:warnings \
		-n logical --dist loadfile --durations=10

demo: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PREFECT_SERVER_ANALYTICS_ENABLED=false $(BIN)/koala run --profile smoke

# The documentation site into site/, offline and strict: a broken link, a missing page or a results file under
# bench/results/ that no page renders fails it. Reference and benchmark pages are generated (docs/hooks/koala_docs.py).
docs: setup
	NO_MKDOCS_2_WARNING=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m mkdocs build --strict --site-dir site

bench: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python bench/decode.py

# llama.cpp beside koala's engine (builds llama-cpp-python into $KOALA_CACHE/llamacpp once: minutes), then the GGUF
# export decoded by llama.cpp itself (`make test` skips that test until the build exists).
bench-llamacpp: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python bench/llamacpp.py
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q -p no:warnings tests/koala/export/test_export.py -k llama_cpp

clean:
	rm -rf $(VENV) .pytest_cache site
