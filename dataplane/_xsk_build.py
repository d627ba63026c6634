"""cffi (API mode) build of ``dataplane._xsk``: libxdp's AF_XDP socket API.

Built at install time through ``setup.py``'s ``cffi_modules``; compiled against the real
headers (``<xdp/xsk.h>``, ``<linux/if_xdp.h>``, ``<linux/if_link.h>``), so every constant
below declared with ``...`` is read from them, and every struct declared with ``...;`` is
laid out by the C compiler, not by us.

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

/* --- libbpf: put a socket's fd in an XSKMAP at any key (0, or a negative errno) -------- */
int bpf_map_update_elem(int fd, const void *key, const void *value, __u64 flags);

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
"""

SOURCE = r"""
#include <errno.h>
#include <stdint.h>
#include <sys/socket.h>
#include <linux/bpf.h>
#include <linux/if_link.h>
#include <linux/if_xdp.h>
#include <bpf/bpf.h>
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
"""


def _pkg_config(*args: str) -> list[str]:
    if shutil.which("pkg-config") is None:
        return []
    try:
        out = subprocess.run(["pkg-config", *args, "libxdp", "libbpf"], check=True,
                             capture_output=True, text=True).stdout  # fmt: skip
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
        "include_dirs": include_dirs, "library_dirs": library_dirs, "libraries": libraries,
        "extra_compile_args": [*extra, "-O2"],
    }  # fmt: skip


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("dataplane._xsk", SOURCE, **_flags())

if __name__ == "__main__":
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    built = ffibuilder.compile(tmpdir=os.path.join(root, "build", "cffi"), verbose=True)
    for old in glob.glob(os.path.join(root, "dataplane", "_xsk.*.so")):
        os.remove(old)  # a stale build with another suffix would shadow this one
    shutil.copy(built, os.path.join(root, "dataplane"))
