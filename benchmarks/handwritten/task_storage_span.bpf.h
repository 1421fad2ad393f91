/* SPDX-License-Identifier: GPL-2.0 */
/* The span body with its begin time in task-local storage instead of a HASH: no hashing, no
 * insert and delete per span; the slot lives with the task and is freed when the task exits.
 * The end zeroes the slot (an end without a begin is ignored, as with the HASH). A failed
 * create (out of memory) is counted like a full begin map. Shared by span_task_storage.bpf.c and
 * span_tp_btf.bpf.c (the same body, attached differently); include after bench_common.bpf.h. */
#ifndef TASK_STORAGE_SPAN_BPF_H
#define TASK_STORAGE_SPAN_BPF_H

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, __u64);
} start SEC(".maps");

static __always_inline void begin(void)
{
	__u64 *ts = bpf_task_storage_get(&start, bpf_get_current_task_btf(), 0,
					 BPF_LOCAL_STORAGE_GET_F_CREATE);

	if (!ts) {
		__sync_fetch_and_add(&begin_overflows, 1);
		return;
	}
	*ts = bpf_ktime_get_ns();
}

static __always_inline void end(void)
{
	__u64 now = bpf_ktime_get_ns();
	__u64 *ts = bpf_task_storage_get(&start, bpf_get_current_task_btf(), 0, 0);

	if (!ts || !*ts)
		return;
	hist_record(now - *ts);
	*ts = 0;
}

#endif
