// SPDX-License-Identifier: GPL-2.0
/* Hand-written span, as a careful eBPF engineer writes it with libbpf: begin time in a HASH keyed
 * by tid, duration into an exp2 histogram in a PERCPU_ARRAY. One object, two pairs of programs:
 * uprobe/uretprobe (attached to pwork_nop by the benchmark) and the getpid syscall tracepoints.
 * The benchmark loads only the pair it measures (autoload). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "bench_common.bpf.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 2048);
	__type(key, __u32);
	__type(value, __u64);
} start SEC(".maps");

static __always_inline void begin(void)
{
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 ts = bpf_ktime_get_ns();

	if (bpf_map_update_elem(&start, &tid, &ts, BPF_ANY))
		__sync_fetch_and_add(&begin_overflows, 1);
}

static __always_inline void end(void)
{
	__u64 now = bpf_ktime_get_ns();
	__u32 tid = (__u32)bpf_get_current_pid_tgid();
	__u64 *tsp = bpf_map_lookup_elem(&start, &tid);

	if (!tsp)
		return;
	hist_record(now - *tsp);
	bpf_map_delete_elem(&start, &tid);
}

BENCH_SPAN_PROGRAMS(begin, end)
