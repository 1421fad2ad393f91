// SPDX-License-Identifier: GPL-2.0
/* Maps only, for the map-read benchmark: a 64-bucket per-CPU histogram as an array (unlabelled
 * metric) and as a hash of 64 keys (a labelled metric's layout: label + bucket). The one program
 * exists so that every libbpf accepts the object; it is never attached. */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

struct hkey {
	char comm[16];
	__u32 bucket;
	__u32 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, __u64);
} hist_array SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 128);
	__type(key, struct hkey);
	__type(value, __u64);
} hist_hash SEC(".maps");

SEC("tp/syscalls/sys_enter_getppid")
int unused(void *ctx)
{
	return 0;
}
