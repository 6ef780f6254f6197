# `make run` and `make test` set up .venv on first use. torch==2.13.0 goes in first so that
# pip takes the local CPU build instead of pulling the CUDA wheels from the registry.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# The suite runs in two pytest-xdist workers where there are two cores: half its time is spent
# waiting (servers, browsers, Ray actors starting), so two take 11 minutes where one takes 18.
# Not more: tests measure this machine (the warm-up's admission, live frame rates), and more
# workers than cores would make what they measure the other workers. TEST_WORKERS=0 runs in-process.
TEST_WORKERS ?= $(shell [ "$$(nproc 2>/dev/null || echo 1)" -ge 2 ] && echo 2 || echo 0)

.PHONY: setup run render test clean

setup: $(STAMP)

# A .venv whose python no longer runs (its python removed or upgraded away), is older than the
# project needs, or has no pip (what a failed `python3 -m venv` leaves) is made again.
# pyproject's requires-python
NEW_ENOUGH := import sys; sys.exit(sys.version_info < (3, 10))
VENV_OK := $(shell "$(PY)" -c 'import pip; $(NEW_ENOUGH)' >/dev/null 2>&1 && echo yes)
ifneq ($(VENV_OK),yes)
$(shell rm -f "$(STAMP)")
endif

$(STAMP): pyproject.toml
	@python3 -c '$(NEW_ENOUGH)' || \
	  { echo "StreamDiff needs Python 3.10 or newer; python3 here is $$(python3 --version 2>&1)" >&2; exit 1; }
	@# (a folder of one's own given as VENV= is never removed: said instead)
	@test "$(VENV_OK)" = yes || [ "$(VENV)" = .venv ] || [ ! -e "$(VENV)" ] || \
	  { echo "$(VENV) has no working python 3.10+ with pip: repair it, or remove it to let make set it up" >&2; exit 1; }
	test "$(VENV_OK)" = yes || { rm -rf "$(VENV)" && python3 -m venv "$(VENV)"; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# `make run` serves the demo (a small model trained in this repo, configs/demo.yaml). Each preset
# carries its own service level (slo: in configs/*.yaml), so no flags are needed.
# Another port: make run RUN_ARGS="--config demo --port 8080".
RUN_ARGS ?= --config demo

run: $(STAMP)
	$(VENV)/bin/streamdiff serve $(RUN_ARGS)

render: $(STAMP)
	$(VENV)/bin/streamdiff render --config demo --input synthetic --prompt "starry night" --output out/render.mp4

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --durations=12 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out
