/* tw_pktgen and tw_sink: the lab's in-kernel traffic generator and its XDP_DROP sink (bcc;
 * loaded by host/exchange/pktgen.py, used by tickwire bench rx and its tests).
 *
 * tw_pktgen is run with BPF_PROG_RUN in live-frames mode (BPF_F_TEST_XDP_LIVE_FRAMES),
 * never attached. User space supplies one template frame (Ethernet, IPv4 without options,
 * UDP, MoldUDP64 payload) and the ingress ifindex of the exchange end of a line (ex-a),
 * and sets a budget of frames (and optionally an interval) in tw_pg_state. Every
 * repetition of the run either transmits one frame or drops its copy:
 *   - budget spent: dropped (counted in TW_PG_IDLE); a dropped page is recycled at once,
 *     so the rest of a call's repetitions pass quickly;
 *   - paced (interval > 0) and the next frame not yet due: dropped (TW_PG_WAITS). A late
 *     sender catches up at most TW_PG_BURST ns worth of frames back to back;
 *   - otherwise the frame gets the run's next sequence number in its MoldUDP64 header
 *     (big endian, UDP payload offset 10), which then advances by the packet's own
 *     message count (offset 18; heartbeats, count 0, and end of session, 0xFFFF, leave
 *     it), so the receiver sees contiguous sequences across calls; a data packet also gets
 *     the low 48 bits of bpf_ktime_get_ns() as the ITCH timestamp of its first message
 *     (the book ignores it; a capture can read the send time). It is counted
 *     (TW_PG_FRAMES, TW_PG_FIRST/LAST send times) and the program returns XDP_TX, which
 *     live-frames mode turns into a redirect out of the ingress interface itself
 *     (ndo_xdp_xmit): on a veth that is the peer's receive path, which needs NAPI on the
 *     peer (an XDP program or GRO there).
 * A template too short for the MoldUDP64 header is counted (TW_PG_SHORT) and dropped.
 * The state is a plain array updated without atomics: one BPF_PROG_RUN at a time per
 * loaded program (host/exchange/pktgen.py serialises them). Live-frames mode does not rewrite a
 * recycled page, so every field that varies is written on every transmitted frame.
 *
 * tw_sink, attached to the appliance end of a line, counts every frame (per CPU: packets,
 * bytes) and drops it: the XDP_DROP ceiling of that interface.
 *
 * Shared with user space, in pktgen.h: the tw_pg_state slots and the frame offsets.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>

#include "pktgen.h"

BPF_ARRAY(tw_pg_state, __u64, TW_PG_STATE_LEN);
BPF_PERCPU_ARRAY(tw_sink_stats, __u64, 2);

static __always_inline __u64 *tw_slot(__u32 i)
{
	return tw_pg_state.lookup(&i);
}

int tw_pktgen(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	unsigned char *p = data;
	__u64 *next = tw_slot(TW_PG_NEXT_SEQ), *frames = tw_slot(TW_PG_FRAMES);
	__u64 *shorts = tw_slot(TW_PG_SHORT), *budget = tw_slot(TW_PG_BUDGET);
	__u64 *interval = tw_slot(TW_PG_INTERVAL), *due = tw_slot(TW_PG_DUE);
	__u64 *burst = tw_slot(TW_PG_BURST), *first = tw_slot(TW_PG_FIRST);
	__u64 *last = tw_slot(TW_PG_LAST), *waits = tw_slot(TW_PG_WAITS);
	__u64 *idle = tw_slot(TW_PG_IDLE);
	__u64 seq, now, at;
	__u16 count;
	int i, stamp;

	if (!next || !frames || !shorts || !budget || !interval || !due || !burst || !first ||
	    !last || !waits || !idle)
		return XDP_DROP;
	if (data + TW_PG_MOLD_END > data_end) {
		*shorts += 1;
		return XDP_DROP;
	}
	if (*budget == 0) {
		*idle += 1;
		return XDP_DROP; /* the page is recycled at once: a cheap spin */
	}
	count = ((__u16)p[TW_PG_COUNT] << 8) | p[TW_PG_COUNT + 1];
	stamp = count != 0 && count != 0xFFFF && data + TW_PG_TS + 6 <= data_end;
	/* the clock costs tens of ns in a VM: unpaced heartbeats read it only for the
	 * first and the last frame of the run */
	now = 0;
	if (*interval || stamp || *first == 0 || *budget == 1)
		now = bpf_ktime_get_ns();
	if (*interval) {
		/* pacing: repetitions before the frame is due are dropped (BPF_PROG_RUN
		 * cannot sleep, and each call costs an RCU grace period, so the caller makes
		 * one long call and the program spins through it) */
		at = *due;
		if (at == 0)
			at = now;
		else if (at + *burst < now)
			at = now - *burst; /* late: catch up a little, never in a long burst */
		if (now < at) {
			*waits += 1;
			return XDP_DROP;
		}
		*due = at + *interval;
	}
	*budget -= 1;
	if (*first == 0)
		*first = now;
	if (now)
		*last = now;

	seq = *next;
	if (count != 0xFFFF)
		*next = seq + count;
#pragma unroll
	for (i = 0; i < 8; i++)
		p[TW_PG_SEQ + i] = seq >> (56 - 8 * i);
	if (stamp) {
#pragma unroll
		for (i = 0; i < 6; i++)
			p[TW_PG_TS + i] = now >> (40 - 8 * i);
	}
	*frames += 1;
	return XDP_TX;
}

int tw_sink(struct xdp_md *ctx)
{
	__u32 k0 = 0, k1 = 1;
	__u64 *packets = tw_sink_stats.lookup(&k0);
	__u64 *bytes = tw_sink_stats.lookup(&k1);

	if (packets)
		*packets += 1;
	if (bytes)
		*bytes += (long)ctx->data_end - (long)ctx->data;
	return XDP_DROP;
}
