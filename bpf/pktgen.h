/* Shared by the lab's packet generator (bpf/pktgen.c, compiled by bcc) and user space
 * (host/exchange/pktgen.py mirrors it; tests/test_bpfabi.py compiles this header with gcc
 * and checks every constant of the mirror against it).
 *
 * The generator's options and counters (slots of tw_pg_state, each a __u64) and where in
 * a template frame it writes. Only constants here.
 */
#ifndef TICKWIRE_BPF_PKTGEN_H
#define TICKWIRE_BPF_PKTGEN_H

/* names (bcc declares them in pktgen.c under exactly these names):
 *   tw_pktgen      XDP program, run with BPF_PROG_RUN (live frames), never attached
 *   tw_sink        XDP program: count and drop
 *   tw_pg_state    BPF_ARRAY         __u64, TW_PG_STATE_LEN slots below
 *   tw_sink_stats  BPF_PERCPU_ARRAY  __u64 packets, bytes
 */

/* tw_pg_state slots: options user space sets, then counters the program keeps */
#define TW_PG_NEXT_SEQ 0  /* sequence stamped into the next frame */
#define TW_PG_FRAMES 1    /* frames transmitted, all runs */
#define TW_PG_SHORT 2     /* template too short for a MoldUDP64 header: dropped */
#define TW_PG_BUDGET 3    /* frames still to transmit in this run (0: every run drops) */
#define TW_PG_INTERVAL 4  /* ns between frames (0: as fast as possible) */
#define TW_PG_DUE 5       /* ktime the next frame is due (0: now) */
#define TW_PG_BURST 6     /* ns a late sender may catch up at once */
#define TW_PG_FIRST 7     /* ktime of the run's first frame (0: none yet) */
#define TW_PG_LAST 8      /* ktime of the run's last frame */
#define TW_PG_WAITS 9     /* repetitions dropped waiting for the next frame to be due */
#define TW_PG_IDLE 10     /* repetitions dropped after the budget was spent */
#define TW_PG_STATE_LEN 16

/* offsets in the frame: Ethernet 14, IPv4 20 (no options), UDP 8, then MoldUDP64 */
#define TW_PG_MOLD (14 + 20 + 8)
#define TW_PG_SEQ (TW_PG_MOLD + 10)
#define TW_PG_COUNT (TW_PG_MOLD + 18)
#define TW_PG_MOLD_END (TW_PG_MOLD + 20)
/* first message block: length(2), type(1), locate(2), tracking(2), timestamp(6) */
#define TW_PG_TS (TW_PG_MOLD_END + 2 + 5)

#endif /* TICKWIRE_BPF_PKTGEN_H */
