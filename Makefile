VENV ?= .venv
# the tests drive ip, tc, nft, tcpdump, nfcapd … from the sbin directories, whatever PATH CI has
export PATH := /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$(PATH)
PY := $(VENV)/bin/python
SLUICE := $(VENV)/bin/sluice

.PHONY: bootstrap test test-kernel lint demo bench clean

bootstrap:
	./scripts/bootstrap.sh

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: bootstrap lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# The tests that need what the development kernel lacks (geneve, ipip, wireguard, kprobes), on
# Debian's own 6.1 kernel in qemu over the host's root: see scripts/vm/run.sh.
TEST_KERNEL_ARGS ?= -m "kernel or lab" tests/kernel/test_doctor.py tests/kernel/test_firewall_geneve.py \
	tests/kernel/test_tunnel_datapath.py tests/kernel/test_tunnel_reconcile.py tests/lab/test_tunnel.py
test-kernel: bootstrap
	./scripts/vm/bootstrap.sh
	./scripts/vm/run.sh 'cd $(CURDIR) && $(PY) -m pytest -q -p no:cacheprovider $(TEST_KERNEL_ARGS)'

demo: bootstrap
	$(PY) scripts/demo.py

bench: bootstrap
	for b in benchmarks/*/bench_*.py; do $(PY) $$b || exit 1; done

clean:
	-$(SLUICE) lab down
	-$(SLUICE) cleanup
