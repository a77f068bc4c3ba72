#!/usr/bin/env bash
# Checks protos/ for breaking changes (buf FILE rules) against main's previous commit.
set -euo pipefail
cd "$(dirname "$0")/.."
buf=node_modules/.bin/buf
if ! git rev-parse -q --verify HEAD~1 >/dev/null || ! git cat-file -e HEAD~1:buf.yaml 2>/dev/null; then
  echo "buf breaking: no previous commit with contracts; nothing to compare"
  exit 0
fi
"$buf" breaking --against ".git#ref=HEAD~1"
echo "buf breaking: no breaking change against HEAD~1"
