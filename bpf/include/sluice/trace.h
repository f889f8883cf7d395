/* sluice/trace.h: per-packet verdict reporting across the chain.
 *
 * Every program reports its decision through sluice_verdict(); the call returns the verdict, so a
 * program ends with `return sluice_verdict(skb, &pkt, SLUICE_DROP, "policy-deny");`.
 * While nobody traces, the cost is one lookup in a one-slot array (inlined by the verifier into a
 * load) and one branch. `sluice trace` sets the switch and the filter in sluice_trace_cfg and reads
 * sluice_trace_events; both live in <bpffs>/sluice/core and are shared by every plugin.
 */
#ifndef SLUICE_TRACE_H
#define SLUICE_TRACE_H

#include <sluice/common.h>
#include <sluice/maps.h>
#include <sluice/parse.h>

struct sluice_trace_cfg {
    __u64 expires_ns; /* tracing stops by itself here (bpf_ktime_get_ns): a reader killed before it
                         could switch tracing off costs nothing for long; live readers renew it */
    __u32 enabled;
    __u32 ifindex; /* 0: any interface */
    __u8 addr[16]; /* either side of the flow; used when has_addr */
    __u16 port;    /* either side; 0: any */
    __u8 proto;    /* 0: any */
    __u8 has_addr;
};

#define SLUICE_TRACE_PLUGIN_LEN 16
#define SLUICE_TRACE_FN_LEN 32
#define SLUICE_TRACE_REASON_LEN 24

struct sluice_trace_event {
    __u64 ts_ns;
    __u64 pkt; /* the skb's address: one packet's events across the chain are consecutive with the
                  same id (ids are reused by later packets) */
    __u32 ifindex;
    __u32 len;
    __s32 verdict;
    __u32 mark;
    char plugin[SLUICE_TRACE_PLUGIN_LEN];
    char fn[SLUICE_TRACE_FN_LEN];
    char reason[SLUICE_TRACE_REASON_LEN];
    struct sluice_flow flow;
    __u64 detail[4]; /* plugin-specific numbers, documented by each plugin */
};

SLUICE_CORE_MAP("array", u32, struct sluice_trace_cfg, sluice_trace_cfg, 1);
SLUICE_CORE_RINGBUF(sluice_trace_events, 64);

static __always_inline int sluice_addr_eq(const __u8 *a, const __u8 *b)
{
    /* no memcmp in BPF (it would become a call the loader cannot relocate); 4-byte words because
     * the structs holding addresses are only 4-byte aligned on the stack */
    const __u32 *x = (const __u32 *)a, *y = (const __u32 *)b;
    return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3];
}

static __always_inline int sluice_trace_wanted(struct __sk_buff *skb, const struct sluice_pkt *pkt,
                                               const struct sluice_trace_cfg *cfg)
{
    if (cfg->ifindex && cfg->ifindex != skb->ifindex)
        return 0;
    if (cfg->proto && cfg->proto != pkt->flow.proto)
        return 0;
    if (cfg->port && cfg->port != pkt->flow.sport && cfg->port != pkt->flow.dport)
        return 0;
    if (cfg->has_addr && !sluice_addr_eq(cfg->addr, pkt->flow.saddr) && !sluice_addr_eq(cfg->addr, pkt->flow.daddr))
        return 0;
    return 1;
}

/* The reserved event when this packet is traced, else NULL. */
static __always_inline struct sluice_trace_event *sluice_trace_begin(struct __sk_buff *skb,
                                                                    const struct sluice_pkt *pkt,
                                                                    int verdict, __u64 d0, __u64 d1,
                                                                    __u64 d2, __u64 d3)
{
    u32 zero = 0;
    struct sluice_trace_cfg *cfg = sluice_trace_cfg.lookup(&zero);
    if (!cfg || sluice_likely(!cfg->enabled))
        return NULL;
    if (bpf_ktime_get_ns() > cfg->expires_ns || !sluice_trace_wanted(skb, pkt, cfg))
        return NULL;
    struct sluice_trace_event *ev = sluice_trace_events.ringbuf_reserve(sizeof(*ev));
    if (!ev)
        return NULL;
    __builtin_memset(ev, 0, sizeof(*ev));
    ev->ts_ns = bpf_ktime_get_ns();
    ev->pkt = (__u64)(long)skb;
    ev->ifindex = skb->ifindex;
    ev->len = skb->len;
    ev->verdict = verdict;
    ev->mark = skb->mark;
    __builtin_memcpy(&ev->flow, &pkt->flow, sizeof(ev->flow));
    ev->detail[0] = d0;
    ev->detail[1] = d1;
    ev->detail[2] = d2;
    ev->detail[3] = d3;
    return ev;
}

static __always_inline void sluice_copy_name(char *dst, const char *src, __u32 src_len, __u32 dst_len)
{
    __u32 n = src_len < dst_len ? src_len : dst_len - 1; /* constant once inlined */
    __builtin_memcpy(dst, src, n);
}


static __always_inline int sluice_trace_verdict(struct __sk_buff *skb, const struct sluice_pkt *pkt, int verdict,
                                                const char *reason, __u32 reason_len, const char *fn,
                                                __u32 fn_len, __u64 d0, __u64 d1, __u64 d2, __u64 d3)
{
    struct sluice_trace_event *ev = sluice_trace_begin(skb, pkt, verdict, d0, d1, d2, d3);
    if (ev) {
        sluice_copy_name(ev->plugin, SLUICE_PLUGIN, sizeof(SLUICE_PLUGIN), SLUICE_TRACE_PLUGIN_LEN);
        sluice_copy_name(ev->fn, fn, fn_len, SLUICE_TRACE_FN_LEN);
        sluice_copy_name(ev->reason, reason, reason_len, SLUICE_TRACE_REASON_LEN);
        sluice_trace_events.ringbuf_submit(ev, 0);
    }
    return verdict;
}

/* Report verdict (and four plugin-specific numbers) for this packet when tracing; return verdict.
 * A macro only so that __func__ and the reason literal are the caller's ("" reason: a reason that is
 * not a literal fails to compile instead of failing the verifier); BCC cannot rewrite map
 * calls inside macros, so the work is in functions. */
#define sluice_verdict_detail(skb, pkt, verdict, reason, d0, d1, d2, d3) \
    sluice_trace_verdict(skb, pkt, verdict, "" reason, sizeof("" reason), __func__, sizeof(__func__), d0, d1, d2, d3)

#define sluice_verdict(skb, pkt, verdict, reason) sluice_verdict_detail(skb, pkt, verdict, reason, 0, 0, 0, 0)

#endif
