// SPDX-License-Identifier: GPL-2.0
/* The two sched spans probec generates, each attached three ways, to compare what the attachment
 * costs on the scheduler's hot path:
 *   runqueue span (examples/runqueue): begins at sched_wakeup / sched_wakeup_new keyed by the woken
 *     thread's pid, if its comm is the workload's; ends at sched_switch keyed by next_pid;
 *   off-CPU span (the off-CPU part of examples/correlation): begins at sched_switch keyed by
 *     prev_pid, if prev's comm is the workload's; ends at the sched_switch that switches it back
 *     in, keyed by next_pid.
 * Attached as:
 *   tp/sched/...: the classic tracepoints (what probec emits): the kernel fills the tracepoint's
 *     record (comms copied, prev_state computed), the program reads it through CO-RE;
 *   tp_btf/...: the same tracepoints' raw form with typed arguments (struct task_struct *p, prev,
 *     next): no record, fields read from the tasks directly;
 *   raw_tp/...: the raw form, untyped: fields read with probe reads (BPF_CORE_READ).
 * Unlike raw sys_enter, each raw sched tracepoint fires exactly as often as its classic one.
 * Same body (begin map, filter, histogram, as the generated code) in every variant: only where
 * the pid and the comm come from differs. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "bench_common.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define COMM_LEN 16

/* As the generated code: a HASH begin map keyed by the pid the tracepoint names. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} begin_ts SEC(".maps");

/* the examples' filter: the workload's thread names (runq's "rq_ping" and "rq_pong") */
static __always_inline bool ours(const char *comm)
{
	return comm[0] == 'r' && comm[1] == 'q' && comm[2] == '_' && comm[3] == 'p' &&
	       ((comm[4] == 'i' && comm[5] == 'n') || (comm[4] == 'o' && comm[5] == 'n')) &&
	       comm[6] == 'g' && comm[7] == 0;
}

static __always_inline void span_begin(__u64 pid, const char *comm)
{
	__u64 now = bpf_ktime_get_ns();

	if (!ours(comm))
		return;
	if (bpf_map_update_elem(&begin_ts, &pid, &now, BPF_ANY) < 0)
		__sync_fetch_and_add(&begin_overflows, 1);
}

/* label_comm: the comm the generated code copies for its label (next_comm); read, as there */
static __always_inline void span_end(__u64 pid, const char *label_comm)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 *ts = bpf_map_lookup_elem(&begin_ts, &pid);
	__u64 d;

	if (!ts)
		return;
	d = now - *ts;
	bpf_map_delete_elem(&begin_ts, &pid);
	if (label_comm[0])	/* keeps the label's read */
		hist_record(d);
}

/* --- classic tracepoints: the record, read through CO-RE (as probec emits) ---------------------- */
struct trace_event_raw_sched_switch___b {
	char prev_comm[16];
	__s32 prev_pid;
	char next_comm[16];
	__s32 next_pid;
} __attribute__((preserve_access_index));
struct trace_event_raw_sched_wakeup_template___b {
	char comm[16];
	__s32 pid;
} __attribute__((preserve_access_index));

static __always_inline void classic_wakeup(void *ctx)
{
	struct trace_event_raw_sched_wakeup_template___b *r = ctx;
	char comm[COMM_LEN] __attribute__((aligned(8)));

	bpf_probe_read_kernel(comm, sizeof(comm), r->comm);
	span_begin(r->pid, comm);
}

SEC("tp/sched/sched_wakeup")
int classic_wakeup_runq(void *ctx)
{
	classic_wakeup(ctx);
	return 0;
}

SEC("tp/sched/sched_wakeup_new")
int classic_wakeup_new_runq(void *ctx)
{
	classic_wakeup(ctx);
	return 0;
}

SEC("tp/sched/sched_switch")
int classic_switch_runq(void *ctx)
{
	struct trace_event_raw_sched_switch___b *r = ctx;
	char next_comm[COMM_LEN] __attribute__((aligned(8)));

	bpf_probe_read_kernel(next_comm, sizeof(next_comm), r->next_comm);
	span_end(r->next_pid, next_comm);
	return 0;
}

SEC("tp/sched/sched_switch")
int classic_switch_offcpu(void *ctx)
{
	struct trace_event_raw_sched_switch___b *r = ctx;
	char prev_comm[COMM_LEN] __attribute__((aligned(8)));
	char next_comm[COMM_LEN] __attribute__((aligned(8)));

	bpf_probe_read_kernel(prev_comm, sizeof(prev_comm), r->prev_comm);
	bpf_probe_read_kernel(next_comm, sizeof(next_comm), r->next_comm);
	span_begin(r->prev_pid, prev_comm);
	span_end(r->next_pid, next_comm);
	return 0;
}

/* --- tp_btf: typed arguments, fields read from the tasks ---------------------------------------- */
static __always_inline void task_wakeup(struct task_struct *p)
{
	char comm[COMM_LEN] __attribute__((aligned(8)));

	bpf_probe_read_kernel(comm, sizeof(comm), p->comm);
	span_begin(p->pid, comm);
}

SEC("tp_btf/sched_wakeup")
int BPF_PROG(btf_wakeup_runq, struct task_struct *p)
{
	task_wakeup(p);
	return 0;
}

SEC("tp_btf/sched_wakeup_new")
int BPF_PROG(btf_wakeup_new_runq, struct task_struct *p)
{
	task_wakeup(p);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(btf_switch_runq, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	char next_comm[COMM_LEN] __attribute__((aligned(8)));

	bpf_probe_read_kernel(next_comm, sizeof(next_comm), next->comm);
	span_end(next->pid, next_comm);
	return 0;
}

SEC("tp_btf/sched_switch")
int BPF_PROG(btf_switch_offcpu, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	char prev_comm[COMM_LEN] __attribute__((aligned(8)));
	char next_comm[COMM_LEN] __attribute__((aligned(8)));

	bpf_probe_read_kernel(prev_comm, sizeof(prev_comm), prev->comm);
	bpf_probe_read_kernel(next_comm, sizeof(next_comm), next->comm);
	span_begin(prev->pid, prev_comm);
	span_end(next->pid, next_comm);
	return 0;
}

/* --- raw_tp: untyped arguments, fields read with probe reads ------------------------------------ */
SEC("raw_tp/sched_wakeup")
int BPF_PROG(raw_wakeup_runq, struct task_struct *p)
{
	char comm[COMM_LEN] __attribute__((aligned(8)));

	bpf_core_read(comm, sizeof(comm), &p->comm);
	span_begin(BPF_CORE_READ(p, pid), comm);
	return 0;
}

SEC("raw_tp/sched_wakeup_new")
int BPF_PROG(raw_wakeup_new_runq, struct task_struct *p)
{
	char comm[COMM_LEN] __attribute__((aligned(8)));

	bpf_core_read(comm, sizeof(comm), &p->comm);
	span_begin(BPF_CORE_READ(p, pid), comm);
	return 0;
}

SEC("raw_tp/sched_switch")
int BPF_PROG(raw_switch_runq, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	char next_comm[COMM_LEN] __attribute__((aligned(8)));

	bpf_core_read(next_comm, sizeof(next_comm), &next->comm);
	span_end(BPF_CORE_READ(next, pid), next_comm);
	return 0;
}

SEC("raw_tp/sched_switch")
int BPF_PROG(raw_switch_offcpu, bool preempt, struct task_struct *prev, struct task_struct *next)
{
	char prev_comm[COMM_LEN] __attribute__((aligned(8)));
	char next_comm[COMM_LEN] __attribute__((aligned(8)));

	bpf_core_read(prev_comm, sizeof(prev_comm), &prev->comm);
	bpf_core_read(next_comm, sizeof(next_comm), &next->comm);
	span_begin(BPF_CORE_READ(prev, pid), prev_comm);
	span_end(BPF_CORE_READ(next, pid), next_comm);
	return 0;
}
