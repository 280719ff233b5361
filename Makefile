# Two commands for a newcomer (README "Quick start"):
#   make demo   installs into .venv on first use, then runs the LoRA example on the default model
#               (replacing an earlier demo's ft-outputs/; the scripts themselves refuse to)
#   make test   installs into .venv on first use, then runs every test (CI runs exactly this)
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
# CPU build of torch where there is no NVIDIA GPU (this version lies on the team machines' disk).
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

demo: install
	$(PY) examples/finetune_llm_lora.py --overwrite_output_dir true   # a demo may run again into ft-outputs/

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) ft-outputs .pytest_cache
