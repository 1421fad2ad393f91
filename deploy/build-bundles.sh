#!/bin/bash
# Build every spec of deploy/specs/ into a core bundle, laid out flat in deploy/bundles/ as the
# ConfigMap holds them: NAME.manifest.json beside the object it names (NAME.bpf.o). The runtime
# image has no compiler, so bundles are built here (or in CI) and shipped; `make deploy-bundles`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=deploy/bundles
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
rm -f "$out"/*.manifest.json "$out"/*.bpf.o
for spec in deploy/specs/*.yaml; do
    ${PYTHON:-python3} -m probec build "$spec" --backend core -o "$tmp/bundle" >/dev/null
    name=$(${PYTHON:-python3} -c 'import json,sys; print(json.load(open(sys.argv[1]))["name"])' "$tmp/bundle/manifest.json")
    object=$(${PYTHON:-python3} -c 'import json,sys; print(json.load(open(sys.argv[1]))["files"]["object"])' "$tmp/bundle/manifest.json")
    cp "$tmp/bundle/manifest.json" "$out/$name.manifest.json"
    cp "$tmp/bundle/$object" "$out/$object"
    rm -rf "$tmp/bundle"
    echo "$out/$name.manifest.json $out/$object"
done
