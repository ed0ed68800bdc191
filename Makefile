# Fieldprint: set-up and entry points. The README's two commands are `make all` and `make test`;
# each creates the virtual environment first when it is missing.

SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# SmolLM2-135M-Instruct's weights, fetched and checksummed by the pipeline's rule (workflow/rules/models.smk)
MODEL := models/SmolLM2-135M-Instruct.Q4_1.gguf
# Debian's TeX Live packages that the paper needs (installed when latexmk is missing).
TEX_PACKAGES := latexmk texlive-latex-recommended texlive-latex-extra texlive-fonts-recommended \
	texlive-science texlive-publishers
export PATH := $(abspath $(VENV))/bin:$(PATH)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup tex model all paper test lint clean

setup: $(STAMP) tex

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[pipeline,test]"
	touch $(STAMP)

tex:
	@command -v latexmk >/dev/null && kpsewhich IEEEtran.cls >/dev/null || { \
	  echo "Installing TeX Live from Debian's packages (about a minute)"; \
	  $(SUDO) apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEX_PACKAGES) >/dev/null; }

# Cached after the first run: make sees the file (the loaders verify its checksum on every use).
model: $(MODEL)

$(MODEL): | $(STAMP)
	$(VENV)/bin/snakemake --cores 1 $@

# The whole pipeline: experiments, figures, generated LaTeX, paper (see README).
all: setup model
	$(VENV)/bin/snakemake --cores all

paper: setup
	$(VENV)/bin/snakemake --cores all paper/main.pdf

# The SLURM self-test (a one-node cluster on this machine; about two minutes) runs where the
# machine allows it (root; apt-get when SLURM is missing) and prints why it skips elsewhere.
test: setup lint model
	$(PY) -m pytest -q --durations=15
	PYTHON=$(abspath $(PY)) workflow/scripts/slurm_selftest.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests
	$(VENV)/bin/snakemake --lint

clean:
	rm -rf results figures/*.pdf figures/*.png figures/smoke paper/generated paper/build paper/main.pdf .snakemake
