#!/usr/bin/env bash
# Export the committed HEAD into .src/ (git-ignored) for the GPU machine, which gets no .git.
# Files whose content did not change keep their old mtime, so a carried kernel-object cache
# (.kcache.tgz, see tools/gpu_session.sh) only recompiles what changed.
set -euo pipefail
top=$(git rev-parse --show-toplevel); cd "$top"
grep -qx '/.src/' .git/info/exclude || echo '/.src/' >> .git/info/exclude
grep -qx '/.kcache.tgz' .git/info/exclude || echo '/.kcache.tgz' >> .git/info/exclude
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
git archive HEAD | tar -x -m -C "$tmp"
git rev-parse --short HEAD > "$tmp/COMMIT"
mkdir -p .src
# copy changed files only (like rsync -rc --delete)
(cd "$tmp" && find . -type f) | while read -r f; do
  if ! cmp -s "$tmp/$f" ".src/$f"; then mkdir -p "$(dirname ".src/$f")"; cp "$tmp/$f" ".src/$f"; fi
done
(cd .src && find . -type f) | while read -r f; do [ -e "$tmp/$f" ] || rm -f ".src/$f"; done
# CACHE_BASE=<commit the carried .kcache.tgz was built from>: files unchanged since then get an old
# mtime, so ninja on the GPU machine (whose clock need not agree with ours) reuses their objects.
if [ -n "${CACHE_BASE:-}" ]; then
  changed=$(git diff --name-only "$CACHE_BASE" HEAD)
  (cd .src && find . -type f) | sed 's|^\./||' | while read -r f; do
    grep -qxF "$f" <<< "$changed" || touch -d "2020-01-01" ".src/$f"
  done
  echo "files changed since $CACHE_BASE keep a fresh mtime: $(echo "$changed" | grep -c . || true)"
fi
echo "exported $(cat .src/COMMIT) to .src/"
