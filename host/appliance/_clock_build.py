"""cffi (API mode) build of ``host.appliance._clock``: the PTP hardware clock ioctls, the
TSC and the system clocks, for ``host.appliance.clock`` (``tickwire calibrate``). (Which PHC
an interface has is an ethtool question: ``dataplane.ethtool``.)

Built at install time through ``setup.py``'s ``cffi_modules``; compiled against the real
``<linux/ptp_clock.h>``, so every constant declared with ``...`` is read from it and every
struct declared with ``...;`` is laid out by the C compiler.

``struct ptp_sys_offset_extended`` is declared with only the fields Tickwire touches: the
word after ``n_samples`` is ``rsv[0]`` in headers before Linux 6.12 and ``clockid`` from
6.12 on (same offset); ``host.appliance.clock`` writes it through a pointer, so either
header builds.

The ``tw_*`` helpers keep the timing-sensitive reads in C, where a Python call's hundreds
of nanoseconds do not widen the brackets: a (TSC, CLOCK_MONOTONIC, TSC) triple, the cost of
one clock read and a (clock A, clock B, clock A) bracket. Each returns 0 or a negative
errno.

``python host/appliance/_clock_build.py`` rebuilds it in place, intermediates under
``build/``.
"""

from __future__ import annotations

import glob
import os
import shutil

from cffi import FFI

CDEF = r"""
typedef int... clockid_t;
typedef long... time_t;
struct timespec { time_t tv_sec; long tv_nsec; ...; };

#define CLOCK_REALTIME ...
#define CLOCK_MONOTONIC ...
#define CLOCK_MONOTONIC_RAW ...
#define O_RDONLY ...
#define O_CLOEXEC ...

/* --- <linux/ptp_clock.h> ---------------------------------------------------------------- */
#define PTP_MAX_SAMPLES ...
#define PTP_CLOCK_GETCAPS ...
#define PTP_SYS_OFFSET_EXTENDED ...
/* PTP_SYS_OFFSET_EXTENDED2 when the header has it (Linux >= 5.19 headers), else 0 */
#define TW_PTP_SYS_OFFSET_EXTENDED2 ...

struct ptp_clock_time {
    long long sec;
    unsigned int nsec;
    ...;
};

struct ptp_sys_offset_extended {
    unsigned int n_samples;
    struct ptp_clock_time ts[...][3];
    ...;
};

struct ptp_clock_caps {
    int max_adj;
    int n_alarm;
    int n_ext_ts;
    int n_per_out;
    int pps;
    int n_pins;
    int cross_timestamping;
    ...;
};

int ioctl(int fd, unsigned long request, ...);
int open(const char *path, int flags, ...);
int close(int fd);
int clock_gettime(clockid_t clk, struct timespec *ts);

/* --- Tickwire helpers ------------------------------------------------------------------- */
/* 1 when built for x86 (rdtsc exists), else 0 */
#define TW_HAVE_TSC ...
unsigned long long tw_rdtsc(void);
/* the tightest of ``tries`` (rdtscp, CLOCK_MONOTONIC ns, rdtscp) brackets into out[3] */
int tw_tsc_mono(int tries, unsigned long long *out);
/* the smallest difference (ns) between two back-to-back reads of ``clk`` over n tries */
long long tw_read_cost(int clk, int n);
/* the tightest of ``tries`` (a, b, a) brackets of two clocks, ns, into out[3] */
int tw_bracket(int clk_a, int clk_b, int tries, long long *out);
"""

SOURCE = r"""
#include <errno.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <linux/ptp_clock.h>
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#define TW_HAVE_TSC 1
#else
#define TW_HAVE_TSC 0
#endif

#ifdef PTP_SYS_OFFSET_EXTENDED2
#define TW_PTP_SYS_OFFSET_EXTENDED2 PTP_SYS_OFFSET_EXTENDED2
#else
#define TW_PTP_SYS_OFFSET_EXTENDED2 0
#endif

static long long tw_ns(int clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static unsigned long long tw_rdtsc(void)
{
#if TW_HAVE_TSC
    return __rdtsc();
#else
    return 0;
#endif
}

static int tw_tsc_mono(int tries, unsigned long long *out)
{
#if TW_HAVE_TSC
    unsigned int aux;
    unsigned long long best = ~0ULL;
    for (int i = 0; i < tries; i++) {
        /* rdtscp waits for earlier instructions; the lfence keeps later ones after it */
        unsigned long long a = __rdtscp(&aux);
        _mm_lfence();
        long long m = tw_ns(CLOCK_MONOTONIC);
        unsigned long long b = __rdtscp(&aux);
        _mm_lfence();
        if (b - a < best) {
            best = b - a;
            out[0] = a;
            out[1] = (unsigned long long)m;
            out[2] = b;
        }
    }
    return 0;
#else
    (void)tries; (void)out;
    return -ENOTSUP;
#endif
}

static long long tw_read_cost(int clk, int n)
{
    long long best = -1;
    for (int i = 0; i < n; i++) {
        long long a = tw_ns(clk), b = tw_ns(clk);
        if (best < 0 || b - a < best)
            best = b - a;
    }
    return best;
}

static int tw_bracket(int clk_a, int clk_b, int tries, long long *out)
{
    long long best = -1;
    for (int i = 0; i < tries; i++) {
        long long a = tw_ns(clk_a), b = tw_ns(clk_b), c = tw_ns(clk_a);
        if (best < 0 || c - a < best) {
            best = c - a;
            out[0] = a;
            out[1] = b;
            out[2] = c;
        }
    }
    return 0;
}
"""

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("host.appliance._clock", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.join(here, "..", "..")
    built = ffibuilder.compile(tmpdir=os.path.join(root, "build", "cffi"), verbose=True)
    for old in glob.glob(os.path.join(here, "_clock.*.so")):
        os.remove(old)  # a stale build with another suffix would shadow this one
    shutil.copy(built, here)
