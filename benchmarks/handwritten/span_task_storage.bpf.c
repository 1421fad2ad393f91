// SPDX-License-Identifier: GPL-2.0
/* The getpid span with its begin time in task-local storage instead of a HASH
 * (task_storage_span.bpf.h), on the four programs every variant attaches. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include "bench_common.bpf.h"
#include "task_storage_span.bpf.h"

char LICENSE[] SEC("license") = "GPL";

BENCH_SPAN_PROGRAMS(begin, end)
