# The README's two commands: `make demo` (the main job end to end) and `make test`.
# Each creates .venv with pip on first use and installs the project with its pinned dependencies.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: demo test test-fast lint venv clean
venv: $(STAMP)

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]' 2>&1 | grep -v "is ignored: it is neither" || true
	$(VENV)/bin/python -c "import segvlm, torch, ray, mlflow, webdataset"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/segvlm demo $(ARGS)

# Fast tests in one process, then every module that starts Ray (marked slow) in a process of its own:
# Ray keeps per-process state across ray.init()/shutdown() that breaks the next module's cluster.
SLOW_MODULES = $(shell grep -rl --include="test_*.py" "mark.slow" tests | sort)
test: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" $(if $(ARGS),$(ARGS),-q)
	@for module in $(SLOW_MODULES); do \
	  echo "== $$module"; \
	  $(VENV)/bin/python -m pytest -m slow $(if $(ARGS),$(ARGS),-q) $$module || exit 1; \
	done

test-fast: $(STAMP)
	$(VENV)/bin/python -m pytest -m "not slow" $(if $(ARGS),$(ARGS),-q)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check segvlm pipeline jobs tests benchmarks

clean:
	rm -rf $(VENV) demo_out
