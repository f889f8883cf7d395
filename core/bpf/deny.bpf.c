/* The core's deny program: attached in the slot of a fail_mode = "closed" program that failed to
 * compile, load or attach with no earlier program there, so the hook fails closed, not open.
 * Recorded under the failed plugin's name: its next successful start replaces it in place. */
#include <uapi/linux/pkt_cls.h>

int sluice_deny(struct __sk_buff *skb)
{
    return TC_ACT_SHOT;
}
