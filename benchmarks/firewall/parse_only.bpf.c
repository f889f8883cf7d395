/* Reference for the firewall benchmark: the shared parser and verdict report, nothing else.
 * What every sluice policy program pays before its own work. */
#include <sluice/sluice.h>

int parse_only(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    if (sluice_parse(skb, &pkt) != SLUICE_PARSE_OK)
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "not-ip");
    return sluice_verdict(skb, &pkt, SLUICE_NEXT, "parsed");
}
