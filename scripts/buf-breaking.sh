#!/usr/bin/env bash
# Checks protos/ for breaking changes (buf FILE rules) against the last release: the newest
# tag `v<major>.<minor>.<patch>` reachable from HEAD. Before the first release, against the
# previous commit. Within mlflow_sidecar.v1 only additive changes pass (README "Compatibility").
set -euo pipefail
cd "$(dirname "$0")/.."
buf=node_modules/.bin/buf
against="$(git describe --tags --abbrev=0 --match 'v[0-9]*.[0-9]*.[0-9]*' HEAD 2>/dev/null || true)"
if [[ -n "$against" ]]; then
  what="the last release $against"
else
  against=HEAD~1
  what="HEAD~1 (no release tag yet)"
fi
if ! git rev-parse -q --verify "$against^{commit}" >/dev/null || ! git cat-file -e "$against:buf.yaml" 2>/dev/null; then
  echo "buf breaking: $what has no contracts; nothing to compare"
  exit 0
fi
"$buf" breaking --against ".git#ref=$(git rev-parse "$against^{commit}")"
echo "buf breaking: no breaking change against $what"
