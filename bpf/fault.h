/* Shared by the lab's wire-fault program (bpf/fault.c, compiled by bcc) and user space
 * (host/exchange/wirefaults.py mirrors it; tests/test_bpfabi.py compiles this header with
 * gcc and checks every constant, size and offset of the mirror against it).
 *
 * Names of the program and its maps, the layout of a line slot's configuration, the
 * fault flags and the counter indices. Only constants and plain structs here.
 */
#ifndef TICKWIRE_BPF_FAULT_H
#define TICKWIRE_BPF_FAULT_H

#include <linux/types.h>

/* names (bcc declares them in fault.c under exactly these names):
 *   tw_fault        the SCHED_CLS program (TC egress, direct action)
 *   tw_fault_cfg    BPF_ARRAY         struct tw_fault_cfg, TW_FAULT_LINES slots
 *   tw_fault_stats  BPF_PERCPU_ARRAY  __u64 counters, TW_FAULT_LINES * TW_FC_LEN
 */
#define TW_FAULT_LINES 2 /* line slots: 0 = A, 1 = B */

/* tw_fault_cfg[slot]: every field a __u64 in host byte order */
struct tw_fault_cfg {
	__u64 ifindex;        /* the line's interface (0 = slot unused) */
	__u64 flags;          /* TW_FF_* */
	__u64 cut_start_ns;   /* cut window [start, end), CLOCK_MONOTONIC ns */
	__u64 cut_end_ns;
	__u64 seq_first;      /* sequence range [first, last], inclusive */
	__u64 seq_last;
	__u64 loss_threshold; /* drop when prandom_u32 < this; 0..TW_LOSS_ONE */
	__u64 group;          /* IPv4 destination (host order, 0 = any) */
	__u64 port;           /* UDP destination port (0 = any) */
};

#define TW_LOSS_ONE 4294967296ULL /* 2^32: loss_threshold that drops every data packet */

/* cfg.flags: the faults armed */
#define TW_FF_ALL 1   /* every feed packet */
#define TW_FF_CUT 2   /* every feed packet inside the cut window */
#define TW_FF_RANGE 4 /* data packets carrying a sequence of [seq_first, seq_last] */
#define TW_FF_LOSS 8  /* data packets, with probability loss_threshold / 2^32 */

/* tw_fault_stats[slot * TW_FC_LEN + TW_FC_*] */
#define TW_FC_SEEN 0              /* every frame the program ran on */
#define TW_FC_PASSED 1            /* TC_ACT_OK */
#define TW_FC_FEED 2              /* feed packets among the seen (dropped or not) */
#define TW_FC_DROPPED_ALL 3
#define TW_FC_DROPPED_CUT 4
#define TW_FC_DROPPED_RANGE 5
#define TW_FC_DROPPED_RANDOM 6
#define TW_FC_DROPPED_MESSAGES 7  /* messages in dropped data packets */
#define TW_FC_FIRST_DROPPED_SEQ 8 /* lowest sequence in a dropped data packet, 0 = none */
#define TW_FC_LAST_DROPPED_SEQ 9  /* highest sequence in a dropped data packet, 0 = none */
#define TW_FC_LEN 10              /* counters per line slot */

#endif /* TICKWIRE_BPF_FAULT_H */
