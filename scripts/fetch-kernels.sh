#!/usr/bin/env bash
# The kernel matrix's older kernels, fetched once and unpacked under $PROBEC_KERNELS_DIR
# (default /opt/probec-kernels), never installed into this machine's /boot:
#   5.10  Debian 11's 5.10 (BTF, ring buffer, fentry, kprobes; no task storage, no get_current_task_btf)
#   5.4   Ubuntu 20.04's 5.4 (no ring buffer, no fentry, no BTF in /sys/kernel/btf), with its headers for BCC
# Each .deb has a pinned URL and SHA-256; a kernel folder is complete only when KERNEL/.complete exists,
# so running this again does nothing. Usage: scripts/fetch-kernels.sh [5.10] [5.4]   (default: all)
# tests/kernels/run_matrix.py boots DIR/boot/vmlinuz-*; virtme-ng takes the modules from DIR/lib/modules.
set -euo pipefail

DEST=${PROBEC_KERNELS_DIR:-/opt/probec-kernels}
DEBIAN=http://deb.debian.org/debian/pool/main/l/linux
UBUNTU=http://archive.ubuntu.com/ubuntu/pool/main/l/linux

# name  folder (the kernel's release)  then: url sha256, one line per .deb
read -r -d '' TABLE <<EOF || true
5.10 5.10.0-32-amd64
$DEBIAN/linux-image-5.10.0-32-amd64-unsigned_5.10.223-1_amd64.deb 53a0ada535b8b35b3ee80ead5ab88036591963941c42dff6881bdb741deebead
5.4 5.4.0-216-generic
$UBUNTU/linux-image-unsigned-5.4.0-216-generic_5.4.0-216.236_amd64.deb a0c4872252ba1e60348fd7216c9a9e27870fcb0fbc8bc9daf8dbf9735a7ea739
$UBUNTU/linux-modules-5.4.0-216-generic_5.4.0-216.236_amd64.deb 6f8da7e233a20a6aafe9bb2c03d7394026a6253c5d5056a4be4d2264ab2e5f45
$UBUNTU/linux-modules-extra-5.4.0-216-generic_5.4.0-216.236_amd64.deb a474645a3edd3bc852024c055f89e650a062a06ea439041d6d0da1d638c3f37e
$UBUNTU/linux-headers-5.4.0-216_5.4.0-216.236_all.deb e84ddb1c339e1d0781c46077103b4fc7352a715250eea0a3cdbeca3ea88d564a
$UBUNTU/linux-headers-5.4.0-216-generic_5.4.0-216.236_amd64.deb 64f12e3a4c8989b29aa7edda57b26964dd90726b4f88aa7c976ef729d55e9345
EOF

wanted=("$@")
for w in "${wanted[@]}"; do
  [[ $w == 5.10 || $w == 5.4 ]] || { echo "fetch-kernels: unknown kernel $w (it fetches 5.10 and 5.4)" >&2; exit 2; }
done
fetch() {  # name release debs...: download, check, unpack into DEST/release
  local name=$1 release=$2; shift 2
  local dir=$DEST/$release
  [ -f "$dir/.complete" ] && return 0
  if ((${#wanted[@]})) && [[ ! " ${wanted[*]} " == *" $name "* ]]; then return 0; fi
  echo "fetch-kernels: fetching the $name kernel ($release) into $dir" >&2
  local work=$DEST/.partial-$release
  rm -rf "$work" && mkdir -p "$work/debs" "$work/root"
  while (($#)); do
    local url=$1 sum=$2 deb=$work/debs/${1##*/}; shift 2
    if ! curl -fsSL --retry 2 --connect-timeout 20 -o "$deb" "$url"; then
      echo "fetch-kernels: cannot download $url (offline, or the archive moved it); the $name kernel is not available" >&2
      rm -rf "$work"; return 1
    fi
    if ! echo "$sum  $deb" | sha256sum --check --status; then
      echo "fetch-kernels: $url does not have the pinned SHA-256 $sum; refusing it" >&2
      rm -rf "$work"; return 1
    fi
    dpkg-deb -x "$deb" "$work/root"
  done
  # Ubuntu ships modules under /lib/modules too; modules.dep is made by a postinst we do not run.
  depmod -a -b "$work/root" "$release"
  # build and source name /usr/src/... absolutely: point them at the headers unpacked here, relatively,
  # so that BCC finds them in a guest that sees this folder where it is.
  local link target
  for link in "$work/root/lib/modules/$release/build" "$work/root/lib/modules/$release/source"; do
    target=$(readlink "$link" 2>/dev/null) || continue
    if [[ $target == /* ]] && [ -d "$work/root$target" ]; then
      ln -sfn "../../..$target" "$link"
    fi
  done
  rm -rf "$work/debs" "$dir"
  mv "$work/root" "$dir" && rmdir "$work"
  touch "$dir/.complete"
}

mkdir -p "$DEST"
status=0
name='' release='' debs=()
while read -r a b; do
  if [[ $a != http* ]]; then
    [ -n "$name" ] && { fetch "$name" "$release" "${debs[@]}" || status=1; }
    name=$a release=$b debs=()
  else
    debs+=("$a" "$b")
  fi
done <<< "$TABLE"
fetch "$name" "$release" "${debs[@]}" || status=1
exit $status
