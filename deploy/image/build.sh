#!/bin/bash
# Build the probec collector image: a Debian 12 root file system (mmdebstrap) holding Python 3.11,
# prometheus_client, libbpf1 and probec's runtime only (probec/cli, runtime/, host/): no compiler/,
# templates/, clang, bpftrace or LLVM. It runs core bundles (probec build SPEC --backend core).
#
#   deploy/image/build.sh [TAG]        (default TAG: localhost/probec-runtime:<version>)
#   deploy/image/build.sh --check      only check the tree the image is made of (seconds, no network)
#
# Needs root, mmdebstrap and buildah, and the Debian mirror of apt's sources (MIRROR: another
# sources file or mirror URL for mmdebstrap). Takes a few minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
VERSION=$(sed -n 's/^__version__ = "\(.*\)"/\1/p' probec/__init__.py)
PACKAGES=python3-minimal,python3-prometheus-client,libbpf1
WORK=${TMPDIR:-/tmp}/probec-image.$$

# the files of the runtime, as they go under /opt/probec in the image
stage() {
    local dest=$1
    mkdir -p "$dest/probec"
    cp probec/__init__.py probec/__main__.py probec/cli.py "$dest/probec/"
    for pkg in runtime host; do
        (cd "$pkg" && find . -name '*.py' -o -name '*.json' | grep -v __pycache__ |
            while read -r f; do install -D -m 0644 "$f" "$dest/probec/$pkg/$f"; done)
    done
}

if [ "${1:-}" = "--check" ]; then
    # what the image gets must run `probec run` and `probec doctor` without the compiler
    mkdir -p "$WORK"; trap 'rm -rf "$WORK"' EXIT
    stage "$WORK/opt/probec"
    test ! -e "$WORK/opt/probec/probec/compiler" && test ! -e "$WORK/opt/probec/probec/templates"
    PYTHONPATH="$WORK/opt/probec" PYTHONDONTWRITEBYTECODE=1 python3 -c '
import sys, probec.cli, probec.runtime.session, probec.runtime.collector, probec.runtime.core_runner, probec.host.features
assert not [m for m in sys.modules if m.startswith(("probec.compiler", "probec.templates", "lark", "jinja2"))], \
    sorted(m for m in sys.modules if m.startswith(("probec.compiler", "probec.templates", "lark", "jinja2")))
print("image tree: runtime only, imports fine")'
    exit 0
fi

TAG=${1:-localhost/probec-runtime:$VERSION}
mkdir -p "$WORK"; trap 'rm -rf "$WORK"' EXIT
stage "$WORK/stage"
cat > "$WORK/stage/probec.sh" <<'WRAP'
#!/bin/sh
PYTHONPATH=/opt/probec PYTHONDONTWRITEBYTECODE=1 exec /usr/bin/python3 -m probec "$@"
WRAP
# essential: the Essential:yes packages and ours, no apt (nothing installs packages at run time);
# merged-usr by the hook, not by the usrmerge package (which pulls in perl)
mmdebstrap --variant=essential --include="$PACKAGES" --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --customize-hook="mkdir -p \"\$1/opt/probec\" && cp -a '$WORK/stage/probec' \"\$1/opt/probec/\" && install -m 0755 '$WORK/stage/probec.sh' \"\$1/usr/local/bin/probec\"" \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/* "$1"/usr/share/doc' \
    bookworm "$WORK/rootfs.tar" "${MIRROR:-/etc/apt/sources.list.d/debian.sources}"
ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$WORK"' EXIT
buildah add "$ctr" "$WORK/rootfs.tar" / >/dev/null
buildah config --entrypoint '["/usr/local/bin/probec"]' --cmd '["run", "/etc/probec/bundles", "--address", "0.0.0.0"]' \
    --port 9435/tcp --label org.opencontainers.image.title=probec-runtime \
    --label org.opencontainers.image.version="$VERSION" "$ctr"
buildah commit --rm "$ctr" "$TAG" >/dev/null
trap 'rm -rf "$WORK"' EXIT
echo "$TAG: $(buildah inspect --type image --format '{{.FromImageID}}' "$TAG" 2>/dev/null | cut -c1-12) \
$(podman image inspect --format '{{.Size}}' "$TAG" 2>/dev/null) bytes"
