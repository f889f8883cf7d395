/* The cost of reporting verdicts: parsing alone vs parsing + sluice_verdict(). */
#include <sluice/sluice.h>

int parse_only(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    sluice_parse(skb, &pkt);
    /* use the result, or the compiler drops the parse: the same decision parse_and_verdict makes */
    return pkt.flow.proto == 255 ? SLUICE_DROP : SLUICE_NEXT;
}

/* Parsing with every field of the flow used, as the trace event would: the fair comparison. */
int parse_full(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    sluice_parse(skb, &pkt);
    const __u64 *w = (const __u64 *)&pkt.flow;
    __u64 fold = w[0] ^ w[1] ^ w[2] ^ w[3] ^ w[4];
    return fold == 0x1234 ? SLUICE_DROP : SLUICE_NEXT;
}

int parse_and_verdict(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    sluice_parse(skb, &pkt);
    return sluice_verdict(skb, &pkt, pkt.flow.proto == 255 ? SLUICE_DROP : SLUICE_NEXT, "bench");
}
