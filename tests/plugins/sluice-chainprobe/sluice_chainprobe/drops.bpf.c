/* Count freed skbs by drop reason: exercises tracepoint attachment. */
#include <linux/skbuff.h> /* enum skb_drop_reason, used by the generated tracepoint struct */
#include <sluice/sluice.h>

SLUICE_MAP("hash", u32, u64, probe_drops, 256);

static __always_inline void count_reason(u32 reason)
{
    u64 one = 1;
    u64 *n = probe_drops.lookup(&reason);
    if (n)
        __sync_fetch_and_add(n, 1);
    else
        probe_drops.update(&reason, &one);
}

TRACEPOINT_PROBE(skb, kfree_skb)
{
    count_reason(args->reason);
    return 0;
}
