#!/usr/bin/env bash
# Mutation testing of the core with cargo-mutants (https://mutants.rs): each mutant of the
# given core files (default: the Raft log, core/src/raft/log.rs) is built and tested with
# the core's unit tests, its Raft rule tests (core/tests/raft_paper.rs, raft_membership.rs) and
# a few seconds of simulation (sim/tests/smoke.rs: 200 raft and 16 queue seeds). A mutant that survives is a change of behaviour nothing notices: a test or a
# checker to add. Results in target/mutants/mutants.out/ (caught.txt, missed.txt, timeout.txt,
# unviable.txt); the summary the README quotes is printed at the end.
#
#   scripts/mutants.sh                                  # 50 mutants: 35-60 min on 2 loaded cores
#   scripts/mutants.sh core/src/raft/quorum.rs core/src/raft/progress.rs   # other files (globs)
#   MUTANTS_ARGS="--shard 0/4" scripts/mutants.sh ...   # extra cargo-mutants options
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$#" -eq 0 ]; then
  set -- core/src/raft/log.rs
fi
files=()
for f in "$@"; do files+=(-f "$f"); done
out=target/mutants
mkdir -p "$out"
# The baseline, here rather than by cargo-mutants: its own baseline runs only the mutated
# package's tests, and the smoke test lives in the simulator's.
nice -n 19 cargo test -p holdfast-core -p holdfast-sim --lib --test smoke --test raft_paper \
  --test raft_membership
# --copy-target: the scratch copy starts from this tree's compiled dependencies.
# shellcheck disable=SC2086
nice -n 19 cargo mutants --package holdfast-core \
  --test-package holdfast-core --test-package holdfast-sim --baseline skip \
  "${files[@]}" --timeout 240 --build-timeout 900 --copy-target true --output "$out" \
  --no-times ${MUTANTS_ARGS:-} -- --lib --test smoke --test raft_paper --test raft_membership || true
m="$out/mutants.out"
count() { if [ -f "$m/$1.txt" ]; then grep -c . "$m/$1.txt" || true; else echo 0; fi; }
echo "caught $(count caught), missed $(count missed), timeout $(count timeout), unviable $(count unviable)"
echo "missed:"
sed 's/^/  /' "$m/missed.txt" 2>/dev/null || true
