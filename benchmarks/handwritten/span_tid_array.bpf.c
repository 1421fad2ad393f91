// SPDX-License-Identifier: GPL-2.0
/* The span with its begin time in a direct-mapped ARRAY: slot = tid mod 4096, tagged with the tid.
 * Array lookups are inlined by the verifier (no helper call, no hashing, nothing to delete).
 * Trade-off: two live threads whose tids collide share a slot; the later begin wins and the
 * earlier span's end finds another tid's tag and is dropped (never mis-measured, unless both
 * threads write the slot at the same instant). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "bench_common.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define SLOTS 4096

struct slot {
	__u64 tid;
	__u64 ts;
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, SLOTS);
	__type(key, __u32);
	__type(value, struct slot);
} start SEC(".maps");

static __always_inline void begin(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u32 idx = tid & (SLOTS - 1);
	struct slot *s = bpf_map_lookup_elem(&start, &idx);

	if (!s)
		return;
	s->tid = tid;
	s->ts = bpf_ktime_get_ns();
}

static __always_inline void end(void)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u32 idx = tid & (SLOTS - 1);
	struct slot *s = bpf_map_lookup_elem(&start, &idx);

	if (!s || s->tid != tid || !s->ts)
		return;
	hist_record(now - s->ts);
	s->ts = 0;
}

BENCH_SPAN_PROGRAMS(begin, end)
