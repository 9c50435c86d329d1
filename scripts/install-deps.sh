#!/bin/sh
# Installs the Debian 12 packages mod_msoauth needs.
#   scripts/install-deps.sh build   -> to build the module and run it (demo)
#   scripts/install-deps.sh test    -> build + everything the test suite uses
#   scripts/install-deps.sh bench   -> test + the load generator and the reference module
#   scripts/install-deps.sh package -> build + what dpkg-buildpackage and lintian need
set -eu
what=${1:-build}
BUILD_PKGS="build-essential autoconf automake libtool pkg-config
  apache2 apache2-dev libapr1-dev libaprutil1-dev
  libaprutil1-dbd-sqlite3 libaprutil1-dbd-pgsql
  libcurl4-openssl-dev libjansson-dev libssl-dev
  python3 python3-cryptography sqlite3 openssl ca-certificates curl"
TEST_PKGS="check python3-pytest postgresql postgresql-client
  chromium chromium-driver python3-selenium procps iproute2
  clang libclang-rt-14-dev"
BENCH_PKGS="wrk libapache2-mod-auth-openidc"
PACKAGE_PKGS="debhelper dh-autoreconf dpkg-dev lintian"
case "$what" in
  build) pkgs=$BUILD_PKGS ;;
  test)  pkgs="$BUILD_PKGS $TEST_PKGS" ;;
  bench) pkgs="$BUILD_PKGS $TEST_PKGS $BENCH_PKGS" ;;
  package) pkgs="$BUILD_PKGS $PACKAGE_PKGS" ;;
  *) echo "usage: $0 build|test|bench|package" >&2; exit 2 ;;
esac
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps: run as root (apt-get needs it), or install these yourself:" >&2
  echo $pkgs >&2
  exit 1
fi
missing=""
for p in $pkgs; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q
  # apache2 and postgresql start their own daemons on install; we run private instances instead.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  apt-get install -y -q --no-install-recommends $missing
fi
