/* tw_fault: wire fault injection for the lab (bcc, BPF_PROG_TYPE_SCHED_CLS; loaded,
 * attached to TC egress of the lines' exchange-side interfaces and driven through its maps
 * by host/exchange/wirefaults.py).
 *
 * One program instance serves a lab's two lines. Line slot i (0 = A, 1 = B) is configured
 * by tw_fault_cfg[i] and counted in tw_fault_stats[i * TW_FC_LEN ...]; a frame belongs to
 * the slot whose cfg.ifindex is the frame's skb->ifindex (the device it leaves by). A
 * frame on no configured interface passes, uncounted.
 *
 * Contract, for every frame of a configured line:
 *   - Parses Ethernet (at most one 802.1Q/802.1AD tag), IPv4 (version 4, ihl >= 5,
 *     20 <= ihl*4 <= total length <= bytes present, not a fragment), UDP
 *     (8 + 20 <= udp length <= IP payload length) and the 20-byte MoldUDP64 header. Every
 *     read goes through bpf_skb_load_bytes, which fails past the end of the packet
 *     (linear or not); a failed read or a failed check means "not a feed packet".
 *   - A feed packet is such a UDP datagram whose destination address and port match
 *     cfg.group and cfg.port (each 0 = any). Only feed packets are ever dropped: ARP,
 *     IGMP, ICMP and re-request answers (unicast, other ports) always pass.
 *   - A feed packet is dropped (TC_ACT_SHOT) by the first of these that applies, and
 *     counted under exactly that reason:
 *       TW_FF_ALL    every feed packet, heartbeats and end-of-session included;
 *       TW_FF_CUT    every feed packet while cut_start_ns <= now < cut_end_ns
 *                    (now = bpf_ktime_get_ns(), CLOCK_MONOTONIC), heartbeats included;
 *       TW_FF_RANGE  data packets (1 <= count <= 0xFFFE) whose messages seq..seq+count-1
 *                    include any sequence of [seq_first, seq_last];
 *       TW_FF_LOSS   data packets for which bpf_get_prandom_u32() < loss_threshold
 *                    (TW_LOSS_ONE = 2^32 = every packet).
 *     Heartbeats (count 0) and end-of-session (0xFFFF) fall only to ALL and CUT.
 *   - Everything else passes (TC_ACT_OK) untouched. The program never modifies a packet.
 * Counters are per CPU (tw_fault_stats): seen = passed + every dropped_*, and for the
 * sequence extremes each CPU keeps its own minimum / maximum (user space folds them).
 *
 * Shared with user space, in fault.h: struct tw_fault_cfg, the TW_FF_* flags, the TW_FC_*
 * counter indices, and the names tw_fault, tw_fault_cfg, tw_fault_stats.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>

#include "fault.h"

#define TW_MOLD_HEADER_LEN 20
#define TW_MOLD_SEQ_OFF 10
#define TW_MOLD_EOS 0xFFFF
#define TW_IP_MF 0x2000
#define TW_IP_OFFSET 0x1fff

struct tw_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

/* the part of the MoldUDP64 header the program needs: Sequence Number, Message Count */
struct tw_mold_tail {
	__be64 seq;
	__be16 count;
} __attribute__((packed));

BPF_ARRAY(tw_fault_cfg, struct tw_fault_cfg, TW_FAULT_LINES);
BPF_PERCPU_ARRAY(tw_fault_stats, __u64, TW_FAULT_LINES * TW_FC_LEN);

static __always_inline void tw_count(__u32 idx, __u64 n)
{
	__u64 *v = tw_fault_stats.lookup(&idx);

	if (v)
		*v += n; /* per-CPU slot: no atomic needed */
}

static __always_inline int tw_pass(__u32 base)
{
	tw_count(base + TW_FC_PASSED, 1);
	return TC_ACT_OK;
}

static __always_inline int tw_drop(__u32 base, __u32 reason, __u64 seq, __u64 count)
{
	__u32 idx;
	__u64 *v;

	tw_count(base + reason, 1);
	if (count == 0 || count == TW_MOLD_EOS)
		return TC_ACT_SHOT; /* heartbeat or end of session: no messages */
	tw_count(base + TW_FC_DROPPED_MESSAGES, count);
	idx = base + TW_FC_FIRST_DROPPED_SEQ;
	v = tw_fault_stats.lookup(&idx);
	if (v && (*v == 0 || seq < *v))
		*v = seq;
	idx = base + TW_FC_LAST_DROPPED_SEQ;
	v = tw_fault_stats.lookup(&idx);
	if (v && seq + count - 1 > *v)
		*v = seq + count - 1;
	return TC_ACT_SHOT;
}

int tw_fault(struct __sk_buff *skb)
{
	struct ethhdr eth;
	struct tw_vlan_hdr vlan;
	struct iphdr iph;
	struct udphdr udp;
	struct tw_mold_tail mold;
	struct tw_fault_cfg *cfg;
	__u32 slot = 0, base, l3, l4, ihl_len, tot_len, udp_len, len = skb->len;
	__u64 flags, seq, count, now;
	__u16 proto;

	cfg = tw_fault_cfg.lookup(&slot);
	if (!cfg || cfg->ifindex != skb->ifindex) {
		slot = 1;
		cfg = tw_fault_cfg.lookup(&slot);
		if (!cfg || cfg->ifindex != skb->ifindex)
			return TC_ACT_OK; /* not a configured line (or one being removed) */
	}
	base = slot * TW_FC_LEN;
	tw_count(base + TW_FC_SEEN, 1);
	flags = cfg->flags; /* parsed even with none armed: the feed counter stays true */

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return tw_pass(base);
	proto = eth.h_proto;
	l3 = sizeof(eth);
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		if (bpf_skb_load_bytes(skb, l3, &vlan, sizeof(vlan)))
			return tw_pass(base);
		proto = vlan.proto;
		l3 += sizeof(vlan);
	}
	if (proto != bpf_htons(ETH_P_IP))
		return tw_pass(base);

	if (bpf_skb_load_bytes(skb, l3, &iph, sizeof(iph)))
		return tw_pass(base);
	if (iph.version != 4 || iph.ihl < 5 || iph.protocol != IPPROTO_UDP)
		return tw_pass(base);
	if (iph.frag_off & bpf_htons(TW_IP_MF | TW_IP_OFFSET))
		return tw_pass(base); /* a fragment has no (whole) MoldUDP64 header */
	ihl_len = iph.ihl * 4;
	tot_len = bpf_ntohs(iph.tot_len);
	if (tot_len < ihl_len || tot_len > len - l3) /* len > l3: the iph read succeeded */
		return tw_pass(base);
	if (cfg->group && bpf_ntohl(iph.daddr) != cfg->group)
		return tw_pass(base);

	l4 = l3 + ihl_len;
	if (bpf_skb_load_bytes(skb, l4, &udp, sizeof(udp)))
		return tw_pass(base);
	udp_len = bpf_ntohs(udp.len);
	if (udp_len < sizeof(udp) + TW_MOLD_HEADER_LEN || udp_len > tot_len - ihl_len)
		return tw_pass(base);
	if (cfg->port && bpf_ntohs(udp.dest) != cfg->port)
		return tw_pass(base);
	if (bpf_skb_load_bytes(skb, l4 + sizeof(udp) + TW_MOLD_SEQ_OFF, &mold, sizeof(mold)))
		return tw_pass(base);
	seq = __builtin_bswap64(mold.seq);
	count = bpf_ntohs(mold.count);
	tw_count(base + TW_FC_FEED, 1);

	if (flags & TW_FF_ALL)
		return tw_drop(base, TW_FC_DROPPED_ALL, seq, count);
	if (flags & TW_FF_CUT) {
		now = bpf_ktime_get_ns();
		if (now >= cfg->cut_start_ns && now < cfg->cut_end_ns)
			return tw_drop(base, TW_FC_DROPPED_CUT, seq, count);
	}
	if (count == 0 || count == TW_MOLD_EOS)
		return tw_pass(base); /* heartbeat, end of session */
	if ((flags & TW_FF_RANGE) && seq <= cfg->seq_last &&
	    seq + count - 1 >= cfg->seq_first)
		return tw_drop(base, TW_FC_DROPPED_RANGE, seq, count);
	if ((flags & TW_FF_LOSS) && (__u64)bpf_get_prandom_u32() < cfg->loss_threshold)
		return tw_drop(base, TW_FC_DROPPED_RANDOM, seq, count);
	return tw_pass(base);
}
