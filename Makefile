# The two commands of the README: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.inti-installed

.PHONY: install demo test lint clean ffmpeg-libs cluster-deps

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e ".[all,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m inti_adapters.demo

# two pytest-xdist workers, one core each (the CI machine has two); the multi-process modules run in
# turn within their group (tests/conftest.py). TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -q $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

# FFmpeg's shared libraries, which torchcodec loads at run time (PyAV ships its own). Installed
# from the system's package manager when missing and we may (root, or password-less sudo);
# otherwise a notice: torchcodec then reports itself unavailable, its tests skip and the
# loader uses PyAV. Never fails.
ffmpeg-libs:
	@if ldconfig -p 2>/dev/null | grep -q 'libavcodec\.so\.'; then \
	  echo "FFmpeg shared libraries: present"; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends ffmpeg >/dev/null) \
	    && echo "FFmpeg shared libraries: installed with apt-get" \
	    || echo "notice: apt-get could not install ffmpeg; torchcodec will be unavailable (PyAV is used)"; \
	else \
	  echo "notice: FFmpeg's shared libraries are missing and cannot be installed here (no apt-get, or not root"; \
	  echo "        and no password-less sudo); torchcodec will be unavailable (PyAV is used). Install ffmpeg 4-8."; \
	fi

# What the cluster tests (tests/test_cluster_*.py) run: network namespaces (iproute2), nginx
# serving shards in one, Slurm's daemons with munge. Installed from the system's package manager when missing
# and we may (root, or password-less sudo), with their services kept from starting (policy-rc.d);
# otherwise a notice: those tests then skip and say why. Never fails.
CLUSTER_PKGS := nginx-light slurm-wlm munge
cluster-deps:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx-light"; \
	{ command -v slurmctld >/dev/null 2>&1 || [ -x /usr/sbin/slurmctld ]; } || missing="$$missing slurm-wlm"; \
	{ command -v munged >/dev/null 2>&1 || [ -x /usr/sbin/munged ]; } || missing="$$missing munge"; \
	{ command -v ip >/dev/null 2>&1 || [ -x /usr/sbin/ip ] || [ -x /sbin/ip ]; } || missing="$$missing iproute2"; \
	if [ -z "$$missing" ]; then \
	  echo "cluster test tools (ip, nginx, slurm, munge): present"; \
	elif command -v apt-get >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] || sudo -n true 2>/dev/null; }; then \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  policy=""; [ -e /usr/sbin/policy-rc.d ] || { policy=1; printf '#!/bin/sh\nexit 101\n' | $$SUDO tee /usr/sbin/policy-rc.d >/dev/null; $$SUDO chmod +x /usr/sbin/policy-rc.d; }; \
	  ($$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null) \
	    && echo "cluster test tools installed with apt-get:$$missing" \
	    || echo "notice: apt-get could not install$$missing; the cluster tests that need them will skip"; \
	  [ -z "$$policy" ] || $$SUDO rm -f /usr/sbin/policy-rc.d; \
	else \
	  echo "notice:$$missing missing and cannot be installed here (no apt-get, or not root and no"; \
	  echo "        password-less sudo); the cluster tests that need them will skip (pytest -ra says why)"; \
	fi

lint: $(STAMP)
	$(PY) -m ruff check inti_adapters tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
