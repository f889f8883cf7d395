VENV ?= .venv
# the tests drive ip, tc, nft, tcpdump, nfcapd … from the sbin directories, whatever PATH CI has
export PATH := /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$(PATH)
PY := $(VENV)/bin/python
SLUICE := $(VENV)/bin/sluice

.PHONY: bootstrap test lint demo bench clean

bootstrap:
	./scripts/bootstrap.sh

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: bootstrap lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: bootstrap
	$(PY) scripts/demo.py

bench: bootstrap
	for b in benchmarks/*/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	-$(SLUICE) lab down
	-$(SLUICE) cleanup
