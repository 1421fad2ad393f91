/* SPDX-License-Identifier: GPL-2.0 */
/* What every hand-written benchmark program shares: the histogram of the benchmark specs,
 * exp2(1us, 1s) = upper edges 1000 * 2^i ns for i = 0..20 (Prometheus `le`: v <= edge), bucket 21
 * is +Inf, and the sum of the values. One PERCPU_ARRAY entry holds all of it, so one (inlined)
 * lookup serves both the bucket and the sum. This is the same work the generated programs do:
 * bucket + sum per span, begin-map overflows counted. */
#ifndef BENCH_COMMON_BPF_H
#define BENCH_COMMON_BPF_H

#define HIST_FIRST_NS 1000ULL
#define HIST_EDGES 21

struct hist {
	__u64 buckets[HIST_EDGES + 1];
	__u64 sum;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct hist);
} hist SEC(".maps");

/* begins that found the begin map full (never on the fast path) */
__u64 begin_overflows;

/* floor(log2(v)) for v >= 1, branch-free (no clz instruction in BPF) */
static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r, shift;

	r = (v > 0xFFFFFFFFULL) << 5;
	v >>= r;
	shift = (v > 0xFFFF) << 4;
	v >>= shift;
	r |= shift;
	shift = (v > 0xFF) << 3;
	v >>= shift;
	r |= shift;
	shift = (v > 0xF) << 2;
	v >>= shift;
	r |= shift;
	shift = (v > 0x3) << 1;
	v >>= shift;
	r |= shift;
	r |= (__u32)(v >> 1);
	return r;
}

/* first i with ns <= 1000 * 2^i: i = ceil(log2(ceil(ns / 1000))) = floor(log2((ns - 1) / 1000)) + 1 */
static __always_inline __u32 exp2_bucket(__u64 ns)
{
	__u32 b;

	if (ns <= HIST_FIRST_NS)
		return 0;
	b = log2_u64((ns - 1) / HIST_FIRST_NS) + 1;
	return b < HIST_EDGES ? b : HIST_EDGES;
}

static __always_inline void hist_record(__u64 ns)
{
	__u32 zero = 0;
	struct hist *h = bpf_map_lookup_elem(&hist, &zero);

	if (!h)
		return;
	h->buckets[exp2_bucket(ns)]++;
	h->sum += ns;
}

/* The four programs every variant attaches: a uprobe/uretprobe pair and the getpid tracepoint
 * pair, each calling the variant's own begin() and end(). */
#define BENCH_SPAN_PROGRAMS(begin_fn, end_fn)			\
	SEC("uprobe")						\
	int uprobe_begin(struct pt_regs *ctx)			\
	{							\
		begin_fn();					\
		return 0;					\
	}							\
	SEC("uretprobe")					\
	int uprobe_end(struct pt_regs *ctx)			\
	{							\
		end_fn();					\
		return 0;					\
	}							\
	SEC("tp/syscalls/sys_enter_getpid")			\
	int getpid_begin(void *ctx)				\
	{							\
		begin_fn();					\
		return 0;					\
	}							\
	SEC("tp/syscalls/sys_exit_getpid")			\
	int getpid_end(void *ctx)				\
	{							\
		end_fn();					\
		return 0;					\
	}

#endif
