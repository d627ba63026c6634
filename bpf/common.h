/* Shared by the XDP steering program (bpf/steer.c, compiled by bcc) and user space
 * (host/appliance/loader.py through its Python mirror dataplane/xdpabi.py, which
 * tests/test_steer.py checks against this file with gcc).
 *
 * Map names, the key/value layouts of the maps, the metadata block the program places in
 * front of every steered packet, and the layout of the per-CPU statistics array.
 * Only constants and plain structs here: no helpers, no kernel-only types.
 */
#ifndef TICKWIRE_BPF_COMMON_H
#define TICKWIRE_BPF_COMMON_H

#include <linux/types.h>

#define TW_MAX_CHANNELS 64 /* channel ids 0..TW_MAX_CHANNELS-1 */
#define TW_MAX_QUEUES 64   /* XSKMAP slots, over all attached interfaces */
#define TW_MAX_IFACES 16   /* interfaces one program instance is attached to */

#define TW_LINE_A 0
#define TW_LINE_B 1

/* Maps (bcc declares them in steer.c under exactly these names):
 *   tw_channels  BPF_HASH          struct tw_chan_key -> struct tw_chan_val, TW_MAX_CHANNELS
 *   tw_ifslots   BPF_HASH          __u32 ifindex -> __u32 first XSKMAP slot, TW_MAX_IFACES
 *   tw_xsks      BPF_XSKMAP        slot -> AF_XDP socket, TW_MAX_QUEUES
 *   tw_stats     BPF_PERCPU_ARRAY  __u64 counters, TW_STATS_LEN
 *
 * One program instance serves every interface it is attached to, and XSKMAP keys are
 * per instance, not per interface: a socket bound to (ifname, queue) lives in slot
 * tw_ifslots[ifindex] + queue. (The kernel refuses to deliver a frame to a socket bound
 * to another device, and drops it, so interfaces must not share slots.)
 */

/* tw_channels key: both fields in NETWORK byte order, as in the IP and UDP headers */
struct tw_chan_key {
	__u32 group; /* IPv4 destination address */
	__u16 port;  /* UDP destination port */
	__u16 pad;   /* always 0 */
};

struct tw_chan_val {
	__u32 channel; /* 0..TW_MAX_CHANNELS-1 */
	__u32 line;    /* TW_LINE_A or TW_LINE_B */
};

/* Placed with bpf_xdp_adjust_meta directly in front of the packet data: in AF_XDP UMEM
 * it sits at desc.addr - TW_META_SIZE. Host byte order. rx_ns is bpf_ktime_get_ns(),
 * i.e. CLOCK_MONOTONIC, taken when the program ran. */
struct tw_meta {
	__u64 rx_ns;
	__u32 channel;
	__u32 line;
};
#define TW_META_SIZE 16

/* tw_stats: global counters first, each a packet count. Every packet the program sees
 * lands in exactly one of them, except subscribed packets that were redirected
 * (TW_G_REDIRECTED) which are the rest. */
#define TW_G_PASS_OTHER 0 /* not subscribed: non-IPv4, non-UDP, other group/port; passed */
#define TW_G_MALFORMED 1  /* truncated or invalid eth/vlan/ipv4/udp header; passed */
#define TW_G_NO_SOCKET 2  /* subscribed, but no AF_XDP socket in the slot; passed */
#define TW_G_META_FAIL 3  /* subscribed, bpf_xdp_adjust_meta failed; passed without meta */
#define TW_G_FRAGMENT 4   /* IPv4 UDP fragment (any); passed, the kernel reassembles */
#define TW_G_REDIRECTED 5 /* subscribed and handed to the XSKMAP (XDP_REDIRECT) */
#define TW_G_NO_SLOT 6    /* subscribed, but the interface/queue has no XSKMAP slot; passed */
#define TW_G_RESERVED 7
#define TW_G_COUNT 8

/* then per (channel, line): packets and bytes (Ethernet frame length as XDP sees it,
 * no FCS, before the metadata is added) of every subscribed packet, whatever became of
 * it afterwards:
 *   TW_STATS_BASE + (channel * 2 + line) * 2 + TW_S_PACKETS | TW_S_BYTES */
#define TW_STATS_BASE 8
#define TW_S_PACKETS 0
#define TW_S_BYTES 1
#define TW_STATS_LEN (TW_STATS_BASE + TW_MAX_CHANNELS * 2 * 2)

#endif /* TICKWIRE_BPF_COMMON_H */
