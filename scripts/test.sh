#!/bin/sh
# Installs what the tests need (Debian 12, as root), builds, and runs every
# test: C unit tests and integration tests against a real httpd, once with a
# normal build (warnings are errors) and once with AddressSanitizer + UBSan.
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
sh scripts/install-deps.sh test

PY=/usr/bin/python3    # Debian's, with python3-pytest and python3-cryptography
work=$(mktemp -d /tmp/msoauth-test.XXXXXX)
chmod 755 "$work"
pgdir="$work/pg"
pgport=$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cleanup() { sh "$top/t/pgcluster.sh" stop "$pgdir" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT INT TERM
MSO_TEST_PGSQL=$(sh t/pgcluster.sh start "$pgdir" "$pgport" | tail -n 1)
export MSO_TEST_PGSQL

run_suite() {   # name build-dir
  name=$1 dir=$2
  echo "=== $name: unit tests"
  make -C "$dir" check || { cat "$dir"/t/unit/*.log 2>/dev/null; return 1; }
  cat "$dir"/t/unit/*.log
  echo "=== $name: integration tests"
  MSO_BUILD_DIR="$dir" $PY -m pytest -p no:cacheprovider -q -ra t/integration \
    --basetemp="$work/pytest-$name"
}

echo "=== build (warnings are errors)"
sh scripts/build.sh build/release --enable-werror CFLAGS="-O2 -g"
run_suite release "$top/build/release"

echo "=== build with AddressSanitizer + UBSan"
sh scripts/build.sh build/asan --enable-werror \
  CFLAGS="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined" \
  LDFLAGS="-fsanitize=address,undefined"
(export MSO_SANITIZE=asan ASAN_OPTIONS=detect_leaks=1; run_suite asan "$top/build/asan")

# Each fuzz target replays its seeds and runs a few seconds (libFuzzer with
# ASan + UBSan): fails on any crash, leak, timeout or broken invariant.
echo "=== fuzz smoke"
sh scripts/fuzz.sh smoke

echo "=== Debian package: build, install, a2enmod, configtest, purge"
sh scripts/test-package.sh
