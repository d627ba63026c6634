/* Test-only XDP program (tests/test_xsk.py): UDP to port PORT gets 16 bytes of metadata in
 * front of the packet (rx time from bpf_ktime_get_ns, MARKER, the rx queue) and goes to the
 * AF_XDP socket registered for its rx queue in `xsks`; everything else, and a queue with no
 * socket, passes to the kernel stack. PORT and MARKER are -D integers checked by the test.
 */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>

#ifndef PORT
#error "PORT (the UDP destination port to redirect) must be defined"
#endif
#ifndef MARKER
#error "MARKER (a 32-bit value written into the metadata) must be defined"
#endif

struct meta {
    u64 rx_ns;
    u32 marker;
    u32 queue;
};

BPF_XSKMAP(xsks, 64);
BPF_ARRAY(counts, u64, 4); /* 0 matched, 1 metadata refused, 2 redirected, 3 passed */

static __always_inline void count(int i)
{
    u64 *c = counts.lookup(&i);
    if (c)
        __sync_fetch_and_add(c, 1);
}

int xdp_redirect_all(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *end = (void *)(long)ctx->data_end;
    struct ethhdr *eth = data;
    struct iphdr *ip;
    struct udphdr *udp;
    struct meta *m;
    int action;

    if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
        return XDP_PASS;
    ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_UDP)
        return XDP_PASS;
    udp = (void *)(ip + 1);
    if ((void *)(udp + 1) > end || udp->dest != htons(PORT))
        return XDP_PASS;
    count(0);
    if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct meta))) {
        count(1);
        return XDP_PASS;
    }
    data = (void *)(long)ctx->data;
    m = (void *)(long)ctx->data_meta;
    if ((void *)(m + 1) > data) {
        count(1);
        return XDP_PASS;
    }
    m->rx_ns = bpf_ktime_get_ns();
    m->marker = MARKER;
    m->queue = ctx->rx_queue_index;
    action = xsks.redirect_map(ctx->rx_queue_index, XDP_PASS);
    count(action == XDP_REDIRECT ? 2 : 3);
    return action;
}
