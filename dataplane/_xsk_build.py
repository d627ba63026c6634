"""cffi (API mode) build of ``dataplane._xsk``: libxdp's AF_XDP socket API, the libbpf
calls on BPF objects (pins, maps, program information, test runs) and the SIOCETHTOOL
ioctl -- every kernel interface of Tickwire that is not netlink (pyroute2) or bcc.

Built at install time through ``setup.py``'s ``cffi_modules``; compiled against the real
headers (``<xdp/xsk.h>``, ``<bpf/bpf.h>``, ``<linux/if_xdp.h>``, ``<linux/if_link.h>``,
``<linux/ethtool.h>``), so every constant below declared with ``...`` is read from them,
and every struct declared with ``...;`` is laid out by the C compiler, not by us.
Python wrappers: ``dataplane.xsk`` (sockets, rings), ``dataplane.xdpabi`` (the XDP attach
flags), ``dataplane.ethtool`` (SIOCETHTOOL), ``host.appliance.bpfsys`` (libbpf).

libxdp's ring functions are ``inline`` in its header; declaring them here makes cffi emit
real, callable wrappers around them. ``tw_*_info`` hand out a ring's addresses and sizes so
numba code (``dataplane.xsk``) can drive the rings itself without calling back into C.

``make setup`` builds it (``pip install -e``, through ``setup.py``); running this file
(``python dataplane/_xsk_build.py``) rebuilds it in place, intermediates under ``build/``.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import subprocess

from cffi import FFI

CDEF = r"""
/* kernel integer types: the exact C types, so pointers to them match */
typedef int... __u16;
typedef int... __u32;
typedef int... __u64;

/* --- constants, values from the headers ------------------------------------------- */
#define XDP_SHARED_UMEM ...
#define XDP_COPY ...
#define XDP_ZEROCOPY ...
#define XDP_USE_NEED_WAKEUP ...
#define XDP_RING_NEED_WAKEUP ...
#define XDP_UMEM_UNALIGNED_CHUNK_FLAG ...
#define XDP_FLAGS_UPDATE_IF_NOEXIST ...
#define XDP_FLAGS_SKB_MODE ...
#define XDP_FLAGS_DRV_MODE ...
#define XDP_FLAGS_HW_MODE ...
#define XDP_FLAGS_REPLACE ...
#define XDP_PACKET_HEADROOM ...
#define XSK_LIBXDP_FLAGS__INHIBIT_PROG_LOAD ...
#define XSK_RING_CONS__DEFAULT_NUM_DESCS ...
#define XSK_RING_PROD__DEFAULT_NUM_DESCS ...
#define XSK_UMEM__DEFAULT_FRAME_SIZE ...
#define XSK_UMEM__DEFAULT_FRAME_HEADROOM ...
#define SOL_XDP ...
#define XDP_STATISTICS ...
#define MSG_DONTWAIT ...

/* --- structures ---------------------------------------------------------------------- */
struct xdp_desc {
    __u64 addr;
    __u32 len;
    __u32 options;
};

struct xdp_statistics {
    __u64 rx_dropped;
    __u64 rx_invalid_descs;
    __u64 tx_invalid_descs;
    __u64 rx_ring_full;
    __u64 rx_fill_ring_empty_descs;
    __u64 tx_ring_empty_descs;
    ...;
};

struct xsk_ring_prod {
    __u32 cached_prod;
    __u32 cached_cons;
    __u32 mask;
    __u32 size;
    __u32 *producer;
    __u32 *consumer;
    void *ring;
    __u32 *flags;
};

struct xsk_ring_cons {
    __u32 cached_prod;
    __u32 cached_cons;
    __u32 mask;
    __u32 size;
    __u32 *producer;
    __u32 *consumer;
    void *ring;
    __u32 *flags;
};

struct xsk_umem;
struct xsk_socket;

struct xsk_umem_config {
    __u32 fill_size;
    __u32 comp_size;
    __u32 frame_size;
    __u32 frame_headroom;
    __u32 flags;
    ...;
};

struct xsk_socket_config {
    __u32 rx_size;
    __u32 tx_size;
    __u32 libxdp_flags;      /* in an anonymous union with libbpf_flags */
    __u32 xdp_flags;
    __u16 bind_flags;
    ...;
};

/* --- libxdp: objects (return 0 or a negative errno) ---------------------------------- */
int xsk_umem__create(struct xsk_umem **umem, void *umem_area, __u64 size,
                     struct xsk_ring_prod *fill, struct xsk_ring_cons *comp,
                     const struct xsk_umem_config *config);
int xsk_socket__create(struct xsk_socket **xsk, const char *ifname, __u32 queue_id,
                       struct xsk_umem *umem, struct xsk_ring_cons *rx,
                       struct xsk_ring_prod *tx, const struct xsk_socket_config *config);
int xsk_socket__create_shared(struct xsk_socket **xsk_ptr, const char *ifname,
                              __u32 queue_id, struct xsk_umem *umem,
                              struct xsk_ring_cons *rx, struct xsk_ring_prod *tx,
                              struct xsk_ring_prod *fill, struct xsk_ring_cons *comp,
                              const struct xsk_socket_config *config);
int xsk_umem__fd(const struct xsk_umem *umem);
int xsk_socket__fd(const struct xsk_socket *xsk);
int xsk_socket__update_xskmap(struct xsk_socket *xsk, int xsks_map_fd);
int xsk_umem__delete(struct xsk_umem *umem);
void xsk_socket__delete(struct xsk_socket *xsk);

/* --- libbpf: BPF objects by fd, pin and id (each: >= 0, or a negative errno) ------------- */
#define BPF_ANY ...
#define BPF_NOEXIST ...
#define BPF_EXIST ...
#define BPF_OBJ_NAME_LEN ...
#define BPF_F_TEST_XDP_LIVE_FRAMES ...

struct bpf_prog_info {
    __u32 type;
    __u32 id;
    char name[...];
    ...;
};

struct bpf_map_info {
    __u32 type;
    __u32 id;
    __u32 key_size;
    __u32 value_size;
    __u32 max_entries;
    char name[...];
    ...;
};

/* BPF_PROG_RUN's arguments; sz must be sizeof(struct bpf_test_run_opts) */
struct bpf_test_run_opts {
    size_t sz;
    const void *data_in;
    void *data_out;
    __u32 data_size_in;
    __u32 data_size_out;
    const void *ctx_in;
    void *ctx_out;
    __u32 ctx_size_in;
    __u32 ctx_size_out;
    __u32 retval;
    int repeat;
    __u32 duration;
    __u32 flags;
    __u32 cpu;
    __u32 batch_size;
    ...;
};

/* the XDP program context, as BPF_PROG_RUN takes it in ctx_in */
struct xdp_md {
    __u32 data;
    __u32 data_end;
    __u32 data_meta;
    __u32 ingress_ifindex;
    __u32 rx_queue_index;
    __u32 egress_ifindex;
    ...;
};

int bpf_obj_pin(int fd, const char *pathname);
int bpf_obj_get(const char *pathname);
int bpf_obj_get_info_by_fd(int bpf_fd, void *info, __u32 *info_len);
int bpf_prog_get_fd_by_id(__u32 id);
int bpf_map_get_fd_by_id(__u32 id);
int bpf_map_lookup_elem(int fd, const void *key, void *value);
int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);
int bpf_map_delete_elem(int fd, const void *key);
int bpf_map_get_next_key(int fd, const void *key, void *next_key);
int bpf_prog_test_run_opts(int prog_fd, struct bpf_test_run_opts *opts);
int libbpf_num_possible_cpus(void);

/* --- <linux/ethtool.h>: SIOCETHTOOL commands ----------------------------------------- */
#define SIOCETHTOOL ...
#define ETHTOOL_GCHANNELS ...
#define ETHTOOL_GET_TS_INFO ...

struct ethtool_channels {
    __u32 cmd;
    __u32 max_rx;
    __u32 max_tx;
    __u32 max_other;
    __u32 max_combined;
    __u32 rx_count;
    __u32 tx_count;
    __u32 other_count;
    __u32 combined_count;
    ...;
};

struct ethtool_ts_info {
    __u32 cmd;
    __u32 so_timestamping;
    int phc_index;
    __u32 tx_types;
    __u32 rx_filters;
    ...;
};

/* rings, features and flow rules (``tickwire preflight``) */
typedef int... __u8;
#define ETHTOOL_GRINGPARAM ...
#define ETHTOOL_GSSET_INFO ...
#define ETHTOOL_GSTRINGS ...
#define ETHTOOL_GFEATURES ...
#define ETHTOOL_GRXCLSRLCNT ...
#define ETHTOOL_GRXCLSRULE ...
#define ETHTOOL_GRXCLSRLALL ...
#define ETH_SS_FEATURES ...
#define ETH_GSTRING_LEN ...
#define TCP_V4_FLOW ...
#define UDP_V4_FLOW ...
#define SCTP_V4_FLOW ...
#define AH_V4_FLOW ...
#define ESP_V4_FLOW ...
#define IPV4_USER_FLOW ...
#define FLOW_EXT ...
#define FLOW_MAC_EXT ...
#define FLOW_RSS ...
#define RX_CLS_FLOW_DISC ...
#define RX_CLS_FLOW_WAKE ...
#define ETHTOOL_RX_FLOW_SPEC_RING ...
#define ETHTOOL_RX_FLOW_SPEC_RING_VF ...
#define ETHTOOL_RX_FLOW_SPEC_RING_VF_OFF ...
/* <linux/net_tstamp.h>: what ETHTOOL_GET_TS_INFO's so_timestamping holds */
#define SOF_TIMESTAMPING_TX_HARDWARE ...
#define SOF_TIMESTAMPING_TX_SOFTWARE ...
#define SOF_TIMESTAMPING_RX_HARDWARE ...
#define SOF_TIMESTAMPING_RX_SOFTWARE ...
#define SOF_TIMESTAMPING_SOFTWARE ...
#define SOF_TIMESTAMPING_SYS_HARDWARE ...
#define SOF_TIMESTAMPING_RAW_HARDWARE ...

struct ethtool_ringparam {
    __u32 cmd;
    __u32 rx_max_pending;
    __u32 rx_mini_max_pending;
    __u32 rx_jumbo_max_pending;
    __u32 tx_max_pending;
    __u32 rx_pending;
    __u32 rx_mini_pending;
    __u32 rx_jumbo_pending;
    __u32 tx_pending;
    ...;
};

/* variable length: the trailing arrays are allocated with ffi.new(TYPE, n) */
struct ethtool_sset_info {
    __u32 cmd;
    __u32 reserved;
    __u64 sset_mask;
    __u32 data[];
};

struct ethtool_gstrings {
    __u32 cmd;
    __u32 string_set;
    __u32 len;
    __u8 data[];
};

struct ethtool_get_features_block {
    __u32 available;
    __u32 requested;
    __u32 active;
    __u32 never_changed;
};

struct ethtool_gfeatures {
    __u32 cmd;
    __u32 size;
    struct ethtool_get_features_block features[];
};

/* an IPv4 flow's fields, in network byte order (tcp, udp, sctp) */
struct ethtool_tcpip4_spec {
    __u32 ip4src;
    __u32 ip4dst;
    __u16 psrc;
    __u16 pdst;
    __u8 tos;
    ...;
};

union ethtool_flow_union {
    struct ethtool_tcpip4_spec tcp_ip4_spec;
    struct ethtool_tcpip4_spec udp_ip4_spec;
    struct ethtool_tcpip4_spec sctp_ip4_spec;
    __u8 hdata[...];
    ...;
};

struct ethtool_rx_flow_spec {
    __u32 flow_type;
    union ethtool_flow_union h_u;
    union ethtool_flow_union m_u;
    __u64 ring_cookie;
    __u32 location;
    ...;
};

struct ethtool_rxnfc {
    __u32 cmd;
    __u32 flow_type;
    __u64 data;
    struct ethtool_rx_flow_spec fs;
    union {
        __u32 rule_cnt;
        __u32 rss_context;
    };
    __u32 rule_locs[];
};

/* --- libxdp: the inline ring functions, as real functions ---------------------------- */
__u64 *xsk_ring_prod__fill_addr(struct xsk_ring_prod *fill, __u32 idx);
const __u64 *xsk_ring_cons__comp_addr(const struct xsk_ring_cons *comp, __u32 idx);
struct xdp_desc *xsk_ring_prod__tx_desc(struct xsk_ring_prod *tx, __u32 idx);
const struct xdp_desc *xsk_ring_cons__rx_desc(const struct xsk_ring_cons *rx, __u32 idx);
int xsk_ring_prod__needs_wakeup(const struct xsk_ring_prod *r);
__u32 xsk_prod_nb_free(struct xsk_ring_prod *r, __u32 nb);
__u32 xsk_cons_nb_avail(struct xsk_ring_cons *r, __u32 nb);
__u32 xsk_ring_prod__reserve(struct xsk_ring_prod *prod, __u32 nb, __u32 *idx);
void xsk_ring_prod__submit(struct xsk_ring_prod *prod, __u32 nb);
__u32 xsk_ring_cons__peek(struct xsk_ring_cons *cons, __u32 nb, __u32 *idx);
void xsk_ring_cons__cancel(struct xsk_ring_cons *cons, __u32 nb);
void xsk_ring_cons__release(struct xsk_ring_cons *cons, __u32 nb);
void *xsk_umem__get_data(void *umem_area, __u64 addr);
__u64 xsk_umem__extract_addr(__u64 addr);
__u64 xsk_umem__extract_offset(__u64 addr);
__u64 xsk_umem__add_offset_to_addr(__u64 addr);

/* --- Tickwire helpers ---------------------------------------------------------------- */
/* out[0..7] = producer*, consumer*, ring*, flags* (addresses), mask, size,
   cached_prod, cached_cons */
#define TW_RING_INFO_LEN ...
void tw_prod_info(const struct xsk_ring_prod *r, __u64 *out);
void tw_cons_info(const struct xsk_ring_cons *r, __u64 *out);
/* recvfrom(fd, NULL, 0, MSG_DONTWAIT): 0, or a negative errno */
int tw_kick(int fd);
/* getsockopt(fd, SOL_XDP, XDP_STATISTICS): 0, or a negative errno */
int tw_statistics(int fd, struct xdp_statistics *out);
/* ioctl(SIOCETHTOOL) on ``ifname`` in the calling thread's network namespace, ``cmd``
   an ethtool command struct with its cmd set: 0, or a negative errno */
int tw_ethtool(const char *ifname, void *cmd);
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <net/if.h>
#include <linux/bpf.h>
#include <linux/ethtool.h>
#include <linux/if_link.h>
#include <linux/if_xdp.h>
#include <linux/net_tstamp.h>
#include <linux/sockios.h>
#include <bpf/bpf.h>
#include <bpf/libbpf.h>
#include <xdp/xsk.h>

#define TW_RING_INFO_LEN 8

#define TW_RING_INFO(r, out) do {                  \
    (out)[0] = (__u64)(uintptr_t)(r)->producer;    \
    (out)[1] = (__u64)(uintptr_t)(r)->consumer;    \
    (out)[2] = (__u64)(uintptr_t)(r)->ring;        \
    (out)[3] = (__u64)(uintptr_t)(r)->flags;       \
    (out)[4] = (r)->mask;                          \
    (out)[5] = (r)->size;                          \
    (out)[6] = (r)->cached_prod;                   \
    (out)[7] = (r)->cached_cons;                   \
} while (0)

static void tw_prod_info(const struct xsk_ring_prod *r, __u64 *out) { TW_RING_INFO(r, out); }
static void tw_cons_info(const struct xsk_ring_cons *r, __u64 *out) { TW_RING_INFO(r, out); }

static int tw_kick(int fd)
{
    if (recvfrom(fd, NULL, 0, MSG_DONTWAIT, NULL, NULL) < 0)
        return -errno;
    return 0;
}

static int tw_statistics(int fd, struct xdp_statistics *out)
{
    socklen_t len = sizeof(*out);
    if (getsockopt(fd, SOL_XDP, XDP_STATISTICS, out, &len) < 0)
        return -errno;
    return 0;
}

static int tw_ethtool(const char *ifname, void *cmd)
{
    struct ifreq ifr;
    int fd, rc = 0;

    if (strlen(ifname) >= IFNAMSIZ)
        return -ENAMETOOLONG;
    fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -errno;
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    ifr.ifr_data = cmd;
    if (ioctl(fd, SIOCETHTOOL, &ifr) < 0)
        rc = -errno;
    close(fd);
    return rc;
}
"""


def _pkg_config(*args: str) -> list[str]:
    if shutil.which("pkg-config") is None:
        return []
    try:
        out = subprocess.run(
            ["pkg-config", *args, "libxdp", "libbpf"], check=True, capture_output=True, text=True
        ).stdout
    except subprocess.CalledProcessError:
        return []
    return shlex.split(out)


def _flags() -> dict:
    cflags = _pkg_config("--cflags")
    libs = _pkg_config("--libs")
    include_dirs = [f[2:] for f in cflags if f.startswith("-I")]
    library_dirs = [f[2:] for f in libs if f.startswith("-L")]
    libraries = [f[2:] for f in libs if f.startswith("-l")] or ["xdp", "bpf"]
    extra = [f for f in cflags if not f.startswith("-I")]
    return {
        "include_dirs": include_dirs,
        "library_dirs": library_dirs,
        "libraries": libraries,
        "extra_compile_args": [*extra, "-O2"],
    }


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("dataplane._xsk", SOURCE, **_flags())

if __name__ == "__main__":
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    built = ffibuilder.compile(tmpdir=os.path.join(root, "build", "cffi"), verbose=True)
    for old in glob.glob(os.path.join(root, "dataplane", "_xsk.*.so")):
        os.remove(old)  # a stale build with another suffix would shadow this one
    shutil.copy(built, os.path.join(root, "dataplane"))
