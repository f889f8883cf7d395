/* The floor every sluice TC program pays: the shared parser and the trace verdict, nothing else.
 * bench_datapath.py reports it beside flowmon so the ratio splits into library and flowmon cost. */
#include <sluice/sluice.h>

int parse_floor(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    if (sluice_parse(skb, &pkt) != SLUICE_PARSE_OK)
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "not-ip");
    return sluice_verdict(skb, &pkt, SLUICE_NEXT, "observed");
}
