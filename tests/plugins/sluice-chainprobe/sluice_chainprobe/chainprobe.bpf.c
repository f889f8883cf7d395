/* Test programs with fixed behaviour, so chain order, pass-through, pins and restarts are visible. */
#include <sluice/sluice.h>

#ifndef CHAINPROBE_SEEN_MAX
#define CHAINPROBE_SEEN_MAX 16
#endif

SLUICE_MAP("array", u32, u64, probe_seen, CHAINPROBE_SEEN_MAX); /* packets per program slot */
SLUICE_MAP("array", u32, u32, probe_drop_port, 1);              /* UDP port probe_drop drops */

static __always_inline void count(u32 slot)
{
    u64 *n = probe_seen.lookup(&slot);
    if (n)
        __sync_fetch_and_add(n, 1);
}

static __always_inline int drop_port(void)
{
    u32 zero = 0;
    u32 *port = probe_drop_port.lookup(&zero);
    return port ? *port : 0;
}

int probe_count(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    sluice_parse(skb, &pkt);
    count(0);
    return sluice_verdict(skb, &pkt, SLUICE_NEXT, "counted");
}

int probe_pass(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    sluice_parse(skb, &pkt);
    count(1);
    return sluice_verdict(skb, &pkt, SLUICE_PASS, "pass");
}

int probe_drop(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    count(2);
    if (sluice_parse(skb, &pkt) != SLUICE_PARSE_OK)
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "not-ip");
    int port = drop_port();
    if (port && pkt.flow.proto == IPPROTO_UDP && pkt.flow.dport == port)
        return sluice_verdict(skb, &pkt, SLUICE_DROP, "udp-port");
    return sluice_verdict(skb, &pkt, SLUICE_NEXT, "no-match");
}
