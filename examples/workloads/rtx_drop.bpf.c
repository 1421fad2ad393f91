// SPDX-License-Identifier: GPL-2.0
/* rtx_drop: a tc classifier for clsact ingress that drops one in every DROP_EVERY TCP segments
 * carrying data to port DROP_PORT, so TCP has to retransmit (netem is not available on this
 * kernel). Everything else passes. Build: clang -O2 -g -target bpf -c rtx_drop.bpf.c
 * Attach:  tc qdisc add dev DEV clsact
 *          tc filter add dev DEV ingress bpf direct-action obj rtx_drop.bpf.o sec tc
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#ifndef DROP_EVERY
#define DROP_EVERY 8
#endif
#ifndef DROP_PORT
#define DROP_PORT 7777
#endif

/* Data segments seen so far and how many were dropped (read them with bpftool map dump). */
__u64 data_segments = 0;
__u64 dropped = 0;

SEC("tc")
int rtx_drop(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct tcphdr *tcp;
	__u32 ip_len, tcp_len, total;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_TCP)
		return TC_ACT_OK;
	ip_len = ip->ihl * 4;
	if (ip_len < sizeof(*ip))
		return TC_ACT_OK;
	tcp = (void *)ip + ip_len;
	if ((void *)(tcp + 1) > end || tcp->dest != bpf_htons(DROP_PORT))
		return TC_ACT_OK;
	tcp_len = tcp->doff * 4;
	total = bpf_ntohs(ip->tot_len);
	if (total <= ip_len + tcp_len)
		return TC_ACT_OK;                  /* no payload: SYN, pure ACK, FIN */
	if (__sync_fetch_and_add(&data_segments, 1) % DROP_EVERY != DROP_EVERY - 1)
		return TC_ACT_OK;
	__sync_fetch_and_add(&dropped, 1);
	return TC_ACT_SHOT;
}

char LICENSE[] SEC("license") = "GPL";
