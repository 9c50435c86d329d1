#!/bin/sh
# Builds mod_msoauth out of tree: scripts/build.sh DIR [configure args...]
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
dir=$1; shift
cd "$top"
if [ ! -x configure ] || [ configure.ac -nt configure ] || [ Makefile.am -nt configure ]; then
  autoreconf -fi >/dev/null 2>&1 || autoreconf -fi
fi
mkdir -p "$dir"
cd "$dir"
# Configure again when the options differ from the last run (another command
# may have configured this directory differently).
opts="$*"
if [ ! -f Makefile ] || [ "$top/configure" -nt Makefile ] \
   || [ "$(cat .build-options 2>/dev/null)" != "$opts" ]; then
  [ -f Makefile ] && make clean >/dev/null 2>&1 || true   # objects of other flags
  "$top/configure" --quiet "$@"
  printf '%s' "$opts" > .build-options
fi
make -j"$(nproc)"
