#!/usr/bin/env bash
# Here, first: tools/export_head.sh (HEAD -> .src/, unchanged files keep their mtimes), then call the
# device tool with carry [".src", ".whl", ".kcache.tgz"] (.kcache.tgz: the last run's $OUT/kcache.tgz).
# One GPU-machine session in one call: install the carried wheels, build sq-kernels from the
# committed HEAD (a clean export, so uncommitted work cannot leak into the result), then run the
# steps named in STEPS. Logs go to $OUT (the device tool brings them back).
#
#   STEPS="build sass tests bench" bash tools/gpu_session.sh
#   TESTS="tests/kernels -x" BENCH="benchmarks/bench_gemm.py --quick; benchmarks/bench_x.py" ...
# `pytest` (not `python -m pytest`) keeps the source tree off sys.path, so the installed package
# with its compiled _C is the one imported.
# Steps: build (always first if named), sass (wgmma in the binary?), tests (pytest $TESTS),
#        sanitize (compute-sanitizer $SANITIZE_TOOLS over tools/sanitize_paths.py $SANITIZE_ARGS),
#        bench (python $BENCH), paths (tools/gemm_paths.py $PATHS_ARGS), cmd ($CMD in the build tree).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SRC=/tmp/sqk-src
STEPS=${STEPS:-"build tests"}
export PYTHONUNBUFFERED=1
[ -f .src/COMMIT ] && export SQ_KERNELS_COMMIT=$(cat .src/COMMIT)  # no .git on the device: results name it
log() { echo "== $(date +%H:%M:%S) $*" | tee -a "$OUT/summary.txt"; }

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader | tee -a "$OUT/summary.txt"

if [[ " $STEPS " == *" build "* ]]; then
  rm -rf "$SRC"; mkdir -p "$SRC"
  # The device tool ships no .git: the caller exports HEAD into .src/ (git archive) and carries it.
  # cp -a keeps mtimes, so with a carried .kcache.tgz (the last build's kernel objects and ninja
  # logs) only the kernel sources that changed since are recompiled.
  if [ -d .src ]; then cp -a .src/. "$SRC"/; else git archive HEAD | tar -x -C "$SRC"; fi
  [ -f .kcache.tgz ] && tar -xzf .kcache.tgz -C "$SRC" && log "kernel object cache restored"
  log "build $(cat .src/COMMIT 2>/dev/null || git rev-parse --short HEAD)"
  start=$(date +%s)
  (cd "$SRC" && SQ_KERNELS_REQUIRE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
     python3 -m pip install --no-build-isolation --no-deps -v . > "$OUT/build.log" 2>&1)
  rc=$?
  log "build rc=$rc in $(( $(date +%s) - start )) s"
  if [ $rc -ne 0 ]; then grep -E "error|Error|FAILED" "$OUT/build.log" | head -40; tail -20 "$OUT/build.log"; exit 1; fi
  [ -n "${KCACHE:-}" ] && tar -czf "$OUT/kcache.tgz" -C "$SRC" build/kernels && log "kernel cache saved"
  so=$(cd /tmp && python3 -c "import sq_kernels._C as c; print(c.__file__)") && log "extension $(du -h "$so" | cut -f1)"
fi
cd "$SRC" || exit 1
# Run from /tmp: with the source tree on sys.path, `import sq_kernels` would find the copy without _C.
(cd /tmp && python3 -c "import sq_kernels; print('extension:', sq_kernels.has_cuda_kernels(), sq_kernels.extension_error(), sq_kernels.built_archs())") 2>&1 | tee -a "$OUT/summary.txt"

for step in $STEPS; do
  case $step in
    build) ;;
    sass)
      so=$(cd /tmp && python3 -c "import sq_kernels._C as c; print(c.__file__)")
      cuobjdump -sass "$so" > /tmp/sass.txt 2>/dev/null
      log "sass: $(grep -c 'IGMMA\|HGMMA' /tmp/sass.txt) wgmma lines, $(grep -c IMMA /tmp/sass.txt) mma.sync int8 lines"
      ;;
    tests)
      log "pytest ${TESTS:-tests}"
      timeout ${TEST_TIMEOUT:-1800} pytest -q -rs ${TESTS:-tests} 2>&1 | tee "$OUT/tests.log" | tail -40
      log "pytest rc=${PIPESTATUS[0]}"
      ;;
    bench)
      IFS=';' read -ra benches <<< "$BENCH"  # several: "a.py --quick; b.py --quick"
      mkdir -p /tmp/bench_out
      for b in "${benches[@]}"; do
        log "bench $b"
        timeout ${BENCH_TIMEOUT:-300} python3 $b --out /tmp/bench_out 2>&1 | tee -a "$OUT/bench.log" | tail -40
      done
      tar -czf "$OUT/bench_results.tgz" -C /tmp/bench_out .  # one file: the tool returns at most 8
      ;;
    sanitize)
      # memcheck and racecheck over one call per kernel path (tools/sanitize_paths.py compares each with
      # the CPU reference, so a clean report also proves the kernels ran)
      cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
      for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
        log "compute-sanitizer --tool $tool ${SANITIZE_ARGS:-}"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout ${SANITIZE_TIMEOUT:-600} "$cs" --tool "$tool" --error-exitcode 1 \
          python3 tools/sanitize_paths.py ${SANITIZE_ARGS:-} > "$OUT/sanitize_$tool.log" 2>&1
        rc=$?
        log "$tool rc=$rc: $(grep -c '^ok' "$OUT/sanitize_$tool.log") ok, $(grep -c '^FAIL' "$OUT/sanitize_$tool.log") FAIL; $(grep -m1 'ERROR SUMMARY' "$OUT/sanitize_$tool.log")"
      done
      ;;
    paths)
      log "gemm paths ${PATHS_ARGS:-}"
      python3 tools/gemm_paths.py ${PATHS_ARGS:-} 2>&1 | tee "$OUT/paths.log"
      ;;
    cmd)
      log "cmd: $CMD"
      bash -c "$CMD" 2>&1 | tee "$OUT/cmd.log" | tail -60
      ;;
  esac
done
log "done"
