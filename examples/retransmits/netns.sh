#!/usr/bin/env bash
# The retransmits example's network: a client and a server in two network namespaces of their
# own, joined by a veth pair, with an optional tc BPF program on the server's ingress that drops
# one in every 8 data segments sent to port 7777 (workloads/rtx_drop.bpf.c; netem is not
# available on this kernel). Nothing is created outside the two namespaces, and deleting them
# removes the veth pair, the qdisc and the tc program with them.
#
#   netns.sh up TAG [drop]          create probec-TAG-c (10.77.0.1) and probec-TAG-s (10.77.0.2)
#   netns.sh run TAG ROUNDS SIZE    rtx server in -s, rtx client in -c; prints "dropped N" when
#                                   the drop program is attached (segments it dropped)
#   netns.sh down TAG               delete both namespaces (no error if they are gone)
#
# Needs root, iproute2 and `make -C examples/workloads`. Loading the tc program loads eBPF.
set -euo pipefail

BUILD="$(cd "$(dirname "$0")/../workloads/build" && pwd)"
PORT=7777

usage() { echo "usage: $0 up TAG [drop] | run TAG ROUNDS SIZE | down TAG" >&2; exit 2; }
[ $# -ge 2 ] || usage
CMD=$1 TAG=$2
[[ "$TAG" =~ ^[A-Za-z0-9_-]{1,40}$ ]] || { echo "bad TAG '$TAG'" >&2; exit 2; }
NC="probec-$TAG-c" NS="probec-$TAG-s"

down() {
  for ns in "$NC" "$NS"; do
    if ip netns list | grep -qw -- "$ns"; then ip netns del "$ns"; fi
  done
}

case "$CMD" in
up)
  [ $# -le 3 ] || usage
  trap 'down' ERR
  ip netns add "$NC"
  ip netns add "$NS"
  ip -n "$NC" link add rtx0 type veth peer name rtx1 netns "$NS"
  ip -n "$NC" addr add 10.77.0.1/24 dev rtx0
  ip -n "$NS" addr add 10.77.0.2/24 dev rtx1
  for ns in "$NC" "$NS"; do ip -n "$ns" link set lo up; done
  ip -n "$NC" link set rtx0 up
  ip -n "$NS" link set rtx1 up
  if [ "${3:-}" = drop ]; then
    ip netns exec "$NS" tc qdisc add dev rtx1 clsact
    ip netns exec "$NS" tc filter add dev rtx1 ingress bpf direct-action obj "$BUILD/rtx_drop.bpf.o" sec tc
  elif [ -n "${3:-}" ]; then
    usage
  fi
  trap - ERR
  ;;
run)
  [ $# -eq 4 ] || usage
  ROUNDS=$3 SIZE=$4
  dir=$(mktemp -d)
  mkfifo "$dir/ready"
  ip netns exec "$NS" "$BUILD/rtx" server "$PORT" "$ROUNDS" "$SIZE" > "$dir/ready" &
  server=$!
  # Whatever happens to the client, the server does not outlive this script.
  trap 'kill "$server" 2>/dev/null || true; rm -rf "$dir"' EXIT
  read -r ready < "$dir/ready" || true
  [ "${ready:-}" = listening ] || { echo "rtx server did not start" >&2; exit 1; }
  ip netns exec "$NC" "$BUILD/rtx" client 10.77.0.2 "$PORT" "$ROUNDS" "$SIZE"
  wait "$server"
  # How many segments the drop program dropped: its global `dropped`, in its .bss map.
  prog=$(ip netns exec "$NS" tc filter show dev rtx1 ingress | sed -n 's/.* id \([0-9]*\) .*/\1/p' | head -1)
  if [ -n "$prog" ]; then
    for map in $(bpftool prog show id "$prog" | sed -n 's/.*map_ids \([0-9,]*\).*/\1/p' | tr , ' '); do
      bpftool map dump id "$map" | sed -n 's/.*"dropped": *\([0-9]*\).*/dropped \1/p'
    done
  fi
  ;;
down)
  [ $# -eq 2 ] || usage
  down
  ;;
*)
  usage
  ;;
esac
