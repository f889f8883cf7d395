#!/bin/sh
# Idempotent setup on Debian 12 as root: system packages, the venv, sluice installed editable.
set -eu
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PKGS="iputils-ping curl procps python3-bpfcc bpfcc-tools linux-headers-amd64 python3-venv iproute2 dnsmasq-base nfdump iperf3 nftables conntrack tcpdump hping3 make"

missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "bootstrap: installing Debian packages:$missing"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing
fi

# BCC's Python bindings are built for Debian's /usr/bin/python3; the venv must see them.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import bcc" 2>/dev/null; then
    rm -rf "$VENV"
    /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.sluice-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # setuptools and wheel in the venv: the tests install plugin packages without build isolation.
    "$VENV/bin/pip" install -q --upgrade pip 'setuptools>=68' wheel
    "$VENV/bin/pip" install -q -e '.[test]'
    touch "$stamp"
fi
