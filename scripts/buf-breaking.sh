#!/usr/bin/env bash
# Checks protos/ for breaking changes (buf FILE rules) against the last release: the newest
# tag `v<major>.<minor>.<patch>` reachable from HEAD. Before the first release, against the
# previous commit. Within mlflow_sidecar.v1 only additive changes pass (README "Compatibility").
#
# The file options that name other languages' generated packages (go_package, java_package,
# ...) are frozen by the first release, as FILE rules freeze everything else. Before it, no
# generated code of those languages has shipped, so the check against the previous commit
# lets them be set: buf.yaml's rules, less those eight.
set -euo pipefail
cd "$(dirname "$0")/.."
buf=node_modules/.bin/buf
against="$(git describe --tags --abbrev=0 --match 'v[0-9]*.[0-9]*.[0-9]*' HEAD 2>/dev/null || true)"
config=()
if [[ -n "$against" ]]; then
  what="the last release $against"
else
  against=HEAD~1
  what="HEAD~1 (no release tag yet)"
  config=(--config "$(.venv/bin/python - <<'PY'
import json

import yaml

with open("buf.yaml") as f:
    config = yaml.safe_load(f)
config["breaking"].setdefault("except", []).extend(
    "FILE_SAME_" + option
    for option in ("CSHARP_NAMESPACE", "GO_PACKAGE", "JAVA_MULTIPLE_FILES",
                   "JAVA_OUTER_CLASSNAME", "JAVA_PACKAGE", "OBJC_CLASS_PREFIX",
                   "PHP_NAMESPACE", "RUBY_PACKAGE")
)
print(json.dumps(config))
PY
)")
fi
if ! git rev-parse -q --verify "$against^{commit}" >/dev/null || ! git cat-file -e "$against:buf.yaml" 2>/dev/null; then
  echo "buf breaking: $what has no contracts; nothing to compare"
  exit 0
fi
"$buf" breaking "${config[@]}" --against ".git#ref=$(git rev-parse "$against^{commit}")"
echo "buf breaking: no breaking change against $what"
