# Two entry points (see README): `make demo` and `make test` (`make test-fast` skips the slow tests).
# All create .venv when missing.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: venv demo evidence test test-fast rehearsal mutation bench clean-venv

venv: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Fed-BioMed 6.4.1 needs Python 3.10 or 3.11; set PYTHON=python3.10)"; exit 2; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements.txt
	$(PY) -m pip install --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The main job on the embedded demo data (tiny CPU settings). DEMO_ARGS=--full prints the paper-scale commands.
demo: $(STAMP)
	$(PY) -m demo.run $(DEMO_ARGS)

# The evidence: the default demo once per seed (about 15 min each here) and the table of mean ± sd, min, max
# over the seeds (evidence_output/EVIDENCE.md). EVIDENCE_ARGS, e.g. "--seeds 0-4".
evidence: $(STAMP)
	$(PY) -m demo.evidence $(EVIDENCE_ARGS)

# One OpenMP thread per process: the end-to-end tests run several processes (Fed-BioMed nodes) at once.
test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest $(PYTEST_ARGS)

# The edit-test loop: every test not marked slow (no Fed-BioMed federation, no whole demo).
test-fast: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Deployment rehearsal (docs/phase1.md#deployment-rehearsal): researcher + 3 nodes on separate network namespaces,
# the documented commands, then network faults; needs root. REHEARSAL_ARGS, e.g. "--faults cut,slow --out DIR".
rehearsal: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(PY) -m robustmedseg.federation.rehearsal $(REHEARSAL_ARGS)

# Mutation testing of the core modules (docs/testing.md): long (hours on 2 cores), niced, not part of `make test`.
# mutmut is installed on demand without its `browse` UI (textual), whose pygments pin clashes with Fed-BioMed's.
# MUTATION_ARGS: module names (tools/mutation.py --list), e.g. `make mutation MUTATION_ARGS="restore metrics"`.
mutation: $(STAMP)
	$(PY) -c "import mutmut" 2>/dev/null || { $(PY) -m pip install --no-deps mutmut==3.8.1 && \
		$(PY) -m pip install "libcst>=1.9" "coverage>=7.3" "setproctitle>=1.3.7"; }
	OMP_NUM_THREADS=1 nice -n 19 $(PY) tools/mutation.py $(MUTATION_ARGS)

# Benchmarks are modules of the bench/ folder, run from the repository root.
bench: $(STAMP)
	$(PY) -m bench.bench_ops
	$(PY) -m bench.bench_model
	$(PY) -m bench.bench_train_step
	$(PY) -m bench.bench_generate
	$(PY) -m bench.bench_federation

clean-venv:
	rm -rf $(VENV)
