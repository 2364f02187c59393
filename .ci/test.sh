#!/usr/bin/env bash
# Install everything twisted-nbd's tests need, then run the whole check:
# ruff, mypy, pytest (unit, composition, packaging and interop tests, plus
# the plain pytest tests), then the same suite again under trial, the
# runner the project's TestCase classes are written for.
#
#   bash .ci/test.sh
#
# Meant for a Debian machine, as root (or with sudo), with no terminal: CI runs
# it through .ci/run. The Debian packages are the NBD tools the interop tests
# and the benchmark (bench/run.py, smoke-tested by tests/test_bench.py) drive,
# and GnuTLS's gnutls-cli/gnutls-serv for the TLS-PSK tests;
# apt is skipped when they are all installed already, so re-runs are fast. The
# project is installed editable with its test extra into the Python that
# "python3" finds (set PYTHON=... to choose another); if that Python is
# Debian's own, which refuses pip (PEP 668), a .venv beside this repository is
# used instead. Exits non-zero if installing or any check fails.
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "${BASH_SOURCE[0]}")/.."

DEBIAN_PACKAGES=(qemu-utils libnbd-bin python3-libnbd fio nbdkit nbdkit-plugin-python nbd-server gnutls-bin)
# A throwaway Ceph cluster for the rbd and s3 backends (tests/interop/ceph.py).
DEBIAN_PACKAGES+=(ceph-mon ceph-mgr ceph-osd ceph-common python3-rados python3-rbd radosgw)
PYTHON=${PYTHON:-python3}

say() { printf '\n== %s\n' "$*"; }

# --- Debian packages -------------------------------------------------------
missing=()
for package in "${DEBIAN_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q '^install ok installed$'; then
        missing+=("$package")
    fi
done
if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    as_root=()
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null || { echo "need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
        as_root=(sudo -n)
    fi
    "${as_root[@]}" apt-get update -q
    "${as_root[@]}" apt-get install -y -q -o Dpkg::Use-Pty=0 "${missing[@]}" </dev/null
else
    say "Debian packages already installed: ${DEBIAN_PACKAGES[*]}"
fi

# --- Python packages -------------------------------------------------------
if "$PYTHON" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")))' \
    && [ -z "${VIRTUAL_ENV:-}" ]; then
    # Debian's own Python: keep out of its packages, but see python3-libnbd.
    if [ ! -x .venv/bin/python ]; then
        say "creating .venv (the system Python refuses pip)"
        "$PYTHON" -m venv --system-site-packages .venv
    fi
    PYTHON=.venv/bin/python
fi
say "installing twisted-nbd (editable) with its test extra into $("$PYTHON" -c 'import sys; print(sys.prefix)')"
"$PYTHON" -m pip install -q -e '.[test]' </dev/null
if command -v pyenv >/dev/null 2>&1; then
    pyenv rehash || true # so a new twistd on PATH is found by the interop tests
fi

# --- Checks ----------------------------------------------------------------
failed=()

say "ruff check"
"$PYTHON" -m ruff check . || failed+=("ruff")

say "mypy"
"$PYTHON" -m mypy || failed+=("mypy")

say "pytest"
# CI=true is left as it is: the interop tests decide for themselves whether a
# missing tool is a skip (on a developer's machine) or a failure (in CI).
status=0
"$PYTHON" -m pytest -p no:cacheprovider -ra "$@" </dev/null || status=$?
if [ "$status" -eq 5 ]; then
    echo "pytest collected no tests" >&2
fi
if [ "$status" -ne 0 ]; then
    failed+=("pytest")
fi

say "trial"
# Trial runs every TestCase (it does not collect the plain pytest functions).
# Extra arguments are pytest's, so a narrowed run (bash .ci/test.sh -k tap)
# skips this second pass.
# Its tests run in parallel, one trial worker process per CPU (-j): the
# interop tests spend much of their time waiting on servers and clients, so
# on 2 cores this pass takes about 4 minutes instead of 7.
if [ "$#" -eq 0 ]; then
    "$PYTHON" -m twisted.trial -j "${TRIAL_JOBS:-$(nproc)}" tests </dev/null || failed+=("trial")
else
    echo "skipped: arguments were given for pytest"
fi

if ((${#failed[@]})); then
    say "FAILED: ${failed[*]}"
    exit 1
fi
say "all checks passed"
