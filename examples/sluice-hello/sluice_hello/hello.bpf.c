/* Count packets per IP protocol on one interface's ingress; an observer, so it always passes. */
#include <sluice/sluice.h>

SLUICE_MAP("percpu_hash", u8, u64, hello_packets, 256);

int hello_ingress(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    if (sluice_parse(skb, &pkt) != SLUICE_PARSE_OK)
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "not-ip");
    u8 proto = pkt.flow.proto;
    u64 one = 1;
    u64 *count = hello_packets.lookup(&proto);
    if (count)
        *count += 1; /* per-CPU value: no atomics needed */
    else
        hello_packets.update(&proto, &one);
    return sluice_verdict(skb, &pkt, SLUICE_NEXT, "counted");
}
