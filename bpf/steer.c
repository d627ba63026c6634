/* tw_steer: the XDP steering program (bcc; loaded and attached by host/appliance/loader.py).
 *
 * Contract, for every frame on an interface it is attached to:
 *   - Parses Ethernet, at most one 802.1Q or 802.1AD tag, IPv4 (version 4, ihl >= 5,
 *     options skipped by ihl, 20 <= ihl*4 <= total length <= bytes present) and UDP
 *     (8 <= udp length <= IP payload length). Every read is bound-checked against
 *     data_end first.
 *   - A UDP datagram whose (destination address, destination port) is in tw_channels is
 *     "subscribed": it is counted for its (channel, line), gets a struct tw_meta in front
 *     of its data (bpf_xdp_adjust_meta) and is redirected to the AF_XDP socket in slot
 *     tw_ifslots[ifindex] + rx queue of tw_xsks. With no socket there, the redirect falls
 *     back to XDP_PASS and the kernel stack receives it as usual.
 *   - IPv4 fragments are never steered: a fragment carries only part of a datagram (and
 *     non-first ones no UDP header), so all of them go to the kernel, which reassembles.
 *     Feeds are sent unfragmented; TW_G_FRAGMENT shows if one is not.
 *   - Everything else is passed (XDP_PASS) and counted in one global counter. The
 *     program never drops: ARP, IGMP, ICMP and control traffic keep working.
 * The stack never sees a subscribed packet that was redirected; counters are per CPU.
 */
#include <uapi/linux/bpf.h>
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

BPF_HASH(tw_channels, struct tw_chan_key, struct tw_chan_val, TW_MAX_CHANNELS);
BPF_HASH(tw_ifslots, __u32, __u32, TW_MAX_IFACES);
BPF_XSKMAP(tw_xsks, TW_MAX_QUEUES);
BPF_PERCPU_ARRAY(tw_stats, __u64, TW_STATS_LEN);

static __always_inline void tw_count(__u32 idx, __u64 n)
{
	__u64 *v = tw_stats.lookup(&idx);

	if (v)
		*v += n; /* per-CPU slot: no atomic needed */
}

static __always_inline int tw_pass(__u32 idx)
{
	tw_count(idx, 1);
	return XDP_PASS;
}

int tw_steer(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct tw_vlan_hdr *vlan;
	struct iphdr *iph;
	struct udphdr *udp;
	struct tw_chan_key key = {};
	struct tw_chan_val *val;
	struct tw_meta *meta;
	__u32 ihl_len, tot_len, udp_len, channel, line, ifindex, slot, idx;
	__u32 *base;
	__u64 frame_len;
	__u16 proto;
	int act;

	if ((void *)(eth + 1) > data_end)
		return tw_pass(TW_G_MALFORMED);
	proto = eth->h_proto;
	iph = (void *)(eth + 1);
	if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD)) {
		vlan = (void *)(eth + 1);
		if ((void *)(vlan + 1) > data_end)
			return tw_pass(TW_G_MALFORMED);
		proto = vlan->proto;
		iph = (void *)(vlan + 1);
	}
	if (proto != bpf_htons(ETH_P_IP))
		return tw_pass(TW_G_PASS_OTHER); /* ARP, IPv6, LLDP, a second tag, ... */

	if ((void *)(iph + 1) > data_end)
		return tw_pass(TW_G_MALFORMED);
	if (iph->version != 4 || iph->ihl < 5)
		return tw_pass(TW_G_MALFORMED);
	ihl_len = iph->ihl * 4;
	tot_len = bpf_ntohs(iph->tot_len);
	/* Older kernels give a byte swap's result no bounds, and their verifier then
	 * rejects the packet arithmetic below ("math between pkt pointer and register with
	 * unbounded min value": Debian 12's 6.1, found by booting the appliance image). The
	 * compiler knows the swap fits 16 bits and would drop a plain mask: hide that from it
	 * so the AND reaches the verifier. */
	asm volatile("" : "+r"(tot_len));
	tot_len &= 0xffff;
	/* frames may carry Ethernet padding after the datagram, never less than it */
	if (tot_len < ihl_len || (void *)iph + tot_len > data_end)
		return tw_pass(TW_G_MALFORMED);
	if (iph->protocol != IPPROTO_UDP)
		return tw_pass(TW_G_PASS_OTHER);
	if (iph->frag_off & bpf_htons(TW_IP_MF | TW_IP_OFFSET))
		return tw_pass(TW_G_FRAGMENT);

	udp = (void *)iph + ihl_len;
	if ((void *)(udp + 1) > data_end)
		return tw_pass(TW_G_MALFORMED);
	udp_len = bpf_ntohs(udp->len);
	if (udp_len < sizeof(*udp) || udp_len > tot_len - ihl_len)
		return tw_pass(TW_G_MALFORMED);

	key.group = iph->daddr;
	key.port = udp->dest;
	val = tw_channels.lookup(&key);
	if (!val)
		return tw_pass(TW_G_PASS_OTHER);
	channel = val->channel;
	line = val->line;
	if (channel >= TW_MAX_CHANNELS || line > TW_LINE_B)
		return tw_pass(TW_G_PASS_OTHER); /* the loader never writes such an entry */

	frame_len = data_end - data;
	idx = TW_STATS_BASE + (channel * 2 + line) * 2;
	tw_count(idx + TW_S_PACKETS, 1);
	tw_count(idx + TW_S_BYTES, frame_len);

	ifindex = ctx->ingress_ifindex;
	base = tw_ifslots.lookup(&ifindex);
	if (!base)
		return tw_pass(TW_G_NO_SLOT);
	slot = *base + ctx->rx_queue_index;
	if (slot >= TW_MAX_QUEUES)
		return tw_pass(TW_G_NO_SLOT);

	/* every packet pointer is invalid after this call: re-derive and re-check */
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct tw_meta)))
		return tw_pass(TW_G_META_FAIL);
	data = (void *)(long)ctx->data;
	meta = (void *)(long)ctx->data_meta;
	if ((void *)(meta + 1) > data)
		return tw_pass(TW_G_META_FAIL);
	meta->rx_ns = bpf_ktime_get_ns();
	meta->channel = channel;
	meta->line = line;

	act = tw_xsks.redirect_map(slot, XDP_PASS);
	tw_count(act == XDP_PASS ? TW_G_NO_SOCKET : TW_G_REDIRECTED, 1);
	return act;
}
