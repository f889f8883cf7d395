/* The core's first program on every TC hook sluice manages: it parses the packet once (L2-L4,
 * VLAN/QinQ, IPv4 options, IPv6 extension chains, fragments, bounded by the IP length) into this
 * CPU's slot of <bpffs>/sluice/core/sluice_pkt_ctx and stamps skb->cb[4], so every later program's
 * sluice_parse()/sluice_packet() is a validated copy or pointer instead of a parse
 * (docs/architecture.md, "Parse once"). It has no opinion: it always returns SLUICE_NEXT. */
#include <sluice/sluice.h>

#define SLUICE_PROLOGUE_PULL 128 /* enough linear bytes for Ethernet, 2 tags, IPv6 + a chain + TCP */

int sluice_prologue(struct __sk_buff *skb)
{
    /* A packet whose headers start in paged data (some drivers, tunnels) would look truncated
     * to direct reads: make the first bytes linear. Rare, so one comparison on the common path. */
    __u32 linear = skb->data_end - skb->data;
    if (linear < skb->len && linear < SLUICE_PROLOGUE_PULL)
        bpf_skb_pull_data(skb, skb->len < SLUICE_PROLOGUE_PULL ? skb->len : SLUICE_PROLOGUE_PULL);
    __u32 zero = 0;
    struct sluice_pkt_ctx *c = sluice_pkt_ctx.lookup(&zero);
    if (c)
        sluice_publish(skb, c);
    return SLUICE_NEXT;
}
