// SPDX-License-Identifier: GPL-2.0
/* The getpid span of span_task_storage.bpf.c (the body of task_storage_span.bpf.h: begin time in
 * task-local storage, the same histogram), attached three ways, to compare what the attachment costs:
 *   tp/syscalls/sys_{enter,exit}_getpid: the classic per-syscall tracepoints (what probec emits);
 *   tp_btf/sys_{enter,exit}: the raw syscall tracepoints with typed arguments (BTF), which fire for
 *     every syscall of every process: the program tests the syscall number itself;
 *   raw_tp/sys_{enter,exit}: the same raw tracepoints, untyped (arguments read with probe reads).
 * At sys_exit the raw tracepoint passes (regs, ret): the number is regs->orig_ax. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>
#include "bench_common.bpf.h"
#include "task_storage_span.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define NR_GETPID 39	/* x86-64 */

SEC("tp/syscalls/sys_enter_getpid")
int classic_begin(void *ctx)
{
	begin();
	return 0;
}

SEC("tp/syscalls/sys_exit_getpid")
int classic_end(void *ctx)
{
	end();
	return 0;
}

SEC("tp_btf/sys_enter")
int BPF_PROG(btf_begin, struct pt_regs *regs, long id)
{
	if (id == NR_GETPID)
		begin();
	return 0;
}

SEC("tp_btf/sys_exit")
int BPF_PROG(btf_end, struct pt_regs *regs, long ret)
{
	if (regs->orig_ax == NR_GETPID)
		end();
	return 0;
}

SEC("raw_tp/sys_enter")
int BPF_PROG(raw_begin, struct pt_regs *regs, long id)
{
	if (id == NR_GETPID)
		begin();
	return 0;
}

SEC("raw_tp/sys_exit")
int BPF_PROG(raw_end, struct pt_regs *regs, long ret)
{
	if (BPF_CORE_READ(regs, orig_ax) == NR_GETPID)
		end();
	return 0;
}
