/* tw_txsteer: the lab's stand-in for a NIC's ntuple flow steering (bcc,
 * BPF_PROG_TYPE_SCHED_CLS; loaded and attached to TC egress of the lines' exchange-side
 * veth ends by host/exchange/txsteer.py when the lab has several channels).
 *
 * A veth hands a packet to its peer's rx queue numbered like the tx queue it was sent on.
 * This program picks that tx queue: a UDP datagram whose (destination address,
 * destination port) is in tw_txq leaves on the queue stored there, so each channel's
 * packets arrive on the appliance end's rx queue of that channel, where its AF_XDP
 * sockets are. Everything else (ARP, IGMP, re-request answers, unknown groups) keeps the
 * queue the kernel picks. The program never drops or changes a packet's bytes.
 *
 * The queue is written as skb->queue_mapping = queue + 1. At TC egress the kernel still
 * picks the tx queue after the program runs (netdev_core_pick_tx; only act_skbedit can
 * tell it to skip that), and the pick -- skb_tx_hash, on a device without XPS maps or
 * ndo_select_queue, as a veth is -- takes a queue_mapping it finds set as a recorded rx
 * queue, queue_mapping - 1, and sends on it. tests/test_channels.py checks the packets
 * really arrive on their queue.
 *
 * Parsing: Ethernet (at most one 802.1Q/802.1AD tag), IPv4 (not a fragment), UDP, every
 * read through bpf_skb_load_bytes (which fails past the end). It returns TC_ACT_UNSPEC,
 * so the filters after it on the hook (the lab's fault program, bpf/fault.c) still run:
 * it must sit before them (a lower tc preference).
 *
 * tw_txq: struct tw_chan_key (bpf/common.h: group and port in network byte order) ->
 * __u32 tx queue, filled by user space before the program is attached.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>

#include "common.h"

#define TW_IP_MF 0x2000
#define TW_IP_OFFSET 0x1fff

struct tw_vlan_hdr {
	__be16 tci;
	__be16 proto;
};

BPF_HASH(tw_txq, struct tw_chan_key, __u32, TW_MAX_CHANNELS);

int tw_txsteer(struct __sk_buff *skb)
{
	struct ethhdr eth;
	struct tw_vlan_hdr vlan;
	struct iphdr iph;
	struct udphdr udp;
	struct tw_chan_key key = {};
	__u32 l3, *queue;
	__u16 proto;

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)))
		return TC_ACT_UNSPEC;
	proto = eth.h_proto;
	l3 = sizeof(eth);
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		if (bpf_skb_load_bytes(skb, l3, &vlan, sizeof(vlan)))
			return TC_ACT_UNSPEC;
		proto = vlan.proto;
		l3 += sizeof(vlan);
	}
	if (proto != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, l3, &iph, sizeof(iph)))
		return TC_ACT_UNSPEC;
	if (iph.version != 4 || iph.ihl < 5 || iph.protocol != IPPROTO_UDP)
		return TC_ACT_UNSPEC;
	if (iph.frag_off & bpf_htons(TW_IP_MF | TW_IP_OFFSET))
		return TC_ACT_UNSPEC;
	if (bpf_skb_load_bytes(skb, l3 + iph.ihl * 4, &udp, sizeof(udp)))
		return TC_ACT_UNSPEC;

	key.group = iph.daddr;
	key.port = udp.dest;
	queue = tw_txq.lookup(&key);
	if (queue) /* user space stores only queues the device has */
		skb->queue_mapping = *queue + 1;
	return TC_ACT_UNSPEC;
}
