// SPDX-License-Identifier: GPL-2.0
/* Hand-written BPF object for tests/test_libbpf_binding.py.
 * Needs no vmlinux.h: only UAPI headers and libbpf's BPF-side headers.
 * Build: clang -O2 -g -target bpf -D__TARGET_ARCH_x86 \
 *          -I/usr/include/x86_64-linux-gnu -c binding_test.bpf.c
 */
#include <stdbool.h>
#include <linux/bpf.h>
#include <linux/ptrace.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/usdt.bpf.h>

#define HIST_SLOTS 64

/* Filled by the loader before load (.rodata). */
const volatile __u32 target_pid = 0;
const volatile __u64 tag = 0;

/* .bss: running call index, used to spread increments over the histogram. */
__u64 call_index = 0;

struct event {
	__u32 pid;
	__u32 tid;
	__u64 seq;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} calls_percpu SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, HIST_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
} hist SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);
	__type(value, __u64);
} calls_by_tid SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* Generic counters: index 0 raw_tp, 1 tp_btf, 2 uprobe, 3 uretprobe,
 * 4 uprobe arg sum, 5 uretprobe return sum, 6 usdt, 7 usdt arg sum,
 * 8 perf_event, 9 kprobe. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 16);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

static __always_inline void counter_add(__u32 idx, __u64 v)
{
	__u64 *c = bpf_map_lookup_elem(&counters, &idx);
	if (c)
		__sync_fetch_and_add(c, v);
}

static __always_inline int current_matches(void)
{
	return (bpf_get_current_pid_tgid() >> 32) == target_pid;
}

SEC("tp/syscalls/sys_enter_getpid")
int count_getpid(void *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u32 zero = 0, tid = (__u32)id, slot;
	__u64 one = 1, *v, seq;
	struct event *e;

	if ((id >> 32) != target_pid)
		return 0;

	v = bpf_map_lookup_elem(&calls_percpu, &zero);
	if (v)
		*v += 1;

	seq = __sync_fetch_and_add(&call_index, 1);
	slot = seq & (HIST_SLOTS - 1);
	v = bpf_map_lookup_elem(&hist, &slot);
	if (v)
		*v += 1;

	v = bpf_map_lookup_elem(&calls_by_tid, &tid);
	if (v)
		__sync_fetch_and_add(v, 1);
	else
		bpf_map_update_elem(&calls_by_tid, &tid, &one, BPF_NOEXIST);

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (e) {
		e->pid = id >> 32;
		e->tid = tid;
		e->seq = seq;
		bpf_ringbuf_submit(e, 0);
	}
	return 0;
}

SEC("raw_tp/sys_enter")
int count_raw_sys_enter(void *ctx)
{
	if (current_matches())
		counter_add(0, 1);
	return 0;
}

SEC("tp_btf/sys_enter")
int count_btf_sys_enter(__u64 *ctx)
{
	if (current_matches())
		counter_add(1, 1);
	return 0;
}

SEC("uprobe")
int BPF_KPROBE(on_target_fn, int arg)
{
	counter_add(2, 1);
	counter_add(4, (__u64)arg);
	return 0;
}

SEC("uretprobe")
int BPF_KRETPROBE(on_target_fn_ret, int ret)
{
	counter_add(3, 1);
	counter_add(5, (__u64)ret);
	return 0;
}

SEC("usdt")
int BPF_USDT(on_tick, int i)
{
	counter_add(6, 1);
	counter_add(7, (__u64)i);
	return 0;
}

SEC("perf_event")
int on_cpu_clock(void *ctx)
{
	counter_add(8, 1);
	return 0;
}

SEC("kprobe/do_nanosleep")
int on_kprobe(void *ctx)
{
	counter_add(9, 1);
	return 0;
}

/* Rejected by the verifier on purpose (hash map value used without a NULL
 * check; kernel 6.18 accepts that for an ARRAY with a constant key); autoload is switched off by the tests except in the one that
 * wants to see the verifier log. */
SEC("tp/syscalls/sys_enter_getppid")
int rejected_by_verifier(void *ctx)
{
	__u32 zero = 0;
	__u64 *v = bpf_map_lookup_elem(&calls_by_tid, &zero);
	*v += 1;
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
