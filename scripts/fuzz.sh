#!/bin/sh
# Coverage-guided fuzzing of lib/ with libFuzzer, ASan and UBSan (clang).
#   scripts/fuzz.sh TARGET [SECONDS]   build what is missing, fuzz one target
#                                      (default 60 s); new inputs go to
#                                      build/fuzz/corpus/TARGET, findings to
#                                      build/fuzz/artifacts/
#   scripts/fuzz.sh all [SECONDS]      every target in turn (default 10 s each)
#   scripts/fuzz.sh smoke              CI: replay each seed corpus, then fuzz
#                                      each target a few seconds (two at a
#                                      time); fails on any crash, leak,
#                                      timeout, sanitizer report or invariant
#   scripts/fuzz.sh build [TARGET...]  build only
#   scripts/fuzz.sh list               the targets
# Needs clang and libclang-rt-14-dev (scripts/install-deps.sh test).
# Environment: FUZZ_OUT (build/fuzz), FUZZ_JOBS (make -j), FUZZ_SMOKE_SECONDS (2),
# FUZZ_SMOKE_JOBS (2), FUZZ_ARGS (more libFuzzer flags).
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
out=${FUZZ_OUT:-$top/build/fuzz}

# One line per target: name and the largest input worth trying (-max_len).
# A new target is t/fuzz/fuzz_NAME.c, t/fuzz/corpus/NAME/ and a line here.
TARGETS="
flow_cookie_open    8192
flow_cookie_header  4096
query               4096
jwt                 16384
jwks                16384
token_answer        8192
graph_page          65536
graph_error         8192
key_file            5000
config_values       1024
json                16384
b64url              4096
"

names() { echo "$TARGETS" | awk 'NF { print $1 }'; }
max_len() { echo "$TARGETS" | awk -v t="$1" '$1 == t { print $2 }'; }
known() { names | grep -qx "$1"; }

build() {
  command -v clang >/dev/null 2>&1 || {
    echo "fuzz: clang not found: sh scripts/install-deps.sh test (clang, libclang-rt-14-dev)" >&2
    exit 1
  }
  make -s -f t/fuzz/fuzz.mk OUT="$out" TARGETS="$*" -j"${FUZZ_JOBS:-$(nproc)}"
}

# Flags every run shares: a sensible memory cap, a per-input time limit, and
# findings named by target.
common_flags() {  # target
  t=$1
  flags="-max_len=$(max_len "$t") -rss_limit_mb=2048 -timeout=10 -print_final_stats=1"
  flags="$flags -artifact_prefix=$out/artifacts/$t-"
  [ -f "t/fuzz/$t.dict" ] && flags="$flags -dict=t/fuzz/$t.dict"
  echo "$flags ${FUZZ_ARGS:-}"
}

run() {  # target seconds
  t=$1 secs=$2
  mkdir -p "$out/corpus/$t" "$out/artifacts"
  echo "=== fuzz $t for ${secs}s"
  # shellcheck disable=SC2046
  "$out/fuzz_$t" $(common_flags "$t") -max_total_time="$secs" \
    "$out/corpus/$t" "t/fuzz/corpus/$t"
}

smoke_one() {  # target workdir: replay the seeds one by one, then a short run
  t=$1 work=$2
  mkdir -p "$work/$t" "$out/artifacts"
  # New inputs go to a scratch folder, never into t/fuzz/corpus.
  # shellcheck disable=SC2046
  if "$out/fuzz_$t" $(common_flags "$t") -runs=0 "t/fuzz/corpus/$t" >"$work/$t.log" 2>&1 \
     && "$out/fuzz_$t" $(common_flags "$t") -max_total_time="$secs" \
          "$work/$t" "t/fuzz/corpus/$t" >>"$work/$t.log" 2>&1; then
    echo ok >"$work/$t.rc"
  else
    echo failed >"$work/$t.rc"
  fi
}

smoke() {
  secs=${FUZZ_SMOKE_SECONDS:-2}
  jobs=${FUZZ_SMOKE_JOBS:-2}
  passed=0 failed=0 failures=""
  build $(names)
  work=$(mktemp -d /tmp/msoauth-fuzz.XXXXXX)
  # A few targets at a time (the machine has 2 cores), reported in order.
  set -- $(names)
  while [ $# -gt 0 ]; do
    batch=""
    while [ $# -gt 0 ] && [ "$(echo $batch | wc -w)" -lt "$jobs" ]; do
      smoke_one "$1" "$work" &
      batch="$batch $1"
      shift
    done
    wait
    for t in $batch; do
      if [ "$(cat "$work/$t.rc")" = ok ]; then
        passed=$((passed + 1))
        echo "fuzz $t: ok ($(grep -ao 'stat::number_of_executed_units: [0-9]*' "$work/$t.log" | tail -n 1 | awk '{print $2}') runs)"
      else
        failed=$((failed + 1)) failures="$failures $t"
        echo "fuzz $t: FAILED"
        tail -n 60 "$work/$t.log"
      fi
    done
  done
  rm -rf "$work"
  [ -z "$failures" ] || echo "fuzz: failed:$failures (inputs in $out/artifacts)"
  echo "fuzz: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
}

cmd=${1:-}
case "$cmd" in
  list) names ;;
  build) shift; if [ $# -gt 0 ]; then build "$@"; else build $(names); fi ;;
  smoke) smoke ;;
  all)
    secs=${2:-10}
    build $(names)
    for t in $(names); do run "$t" "$secs"; done ;;
  ""|-h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; [ -n "$cmd" ] ;;
  *)
    known "$cmd" || { echo "fuzz: no target $cmd (scripts/fuzz.sh list)" >&2; exit 2; }
    build "$cmd"
    run "$cmd" "${2:-60}" ;;
esac
