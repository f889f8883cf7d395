/* What a plugin program gets from the shared parser, copied into an array for the tests:
 * parse_probe_copy through sluice_parse(), parse_probe_ptr through sluice_packet(). */
#include <sluice/sluice.h>

struct parse_seen {
    struct sluice_pkt pkt;
    __s32 result;
    __u32 stamp; /* skb->cb[SLUICE_CB_STAMP] after the parse */
};

BPF_ARRAY(parse_seen, struct parse_seen, 1);

int parse_probe_copy(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct parse_seen *out = parse_seen.lookup(&zero);
    if (!out)
        return SLUICE_NEXT;
    out->result = sluice_parse(skb, &out->pkt);
    out->stamp = skb->cb[SLUICE_CB_STAMP];
    return SLUICE_NEXT;
}

int parse_probe_ptr(struct __sk_buff *skb)
{
    __u32 zero = 0;
    struct parse_seen *out = parse_seen.lookup(&zero);
    if (!out)
        return SLUICE_NEXT;
    int result;
    const struct sluice_pkt *pkt = sluice_packet(skb, &result);
    if (pkt)
        __builtin_memcpy(&out->pkt, pkt, sizeof(out->pkt));
    out->result = result;
    out->stamp = skb->cb[SLUICE_CB_STAMP];
    return SLUICE_NEXT;
}
