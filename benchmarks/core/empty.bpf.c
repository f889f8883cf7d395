// The cheapest possible TC program: the baseline per-packet cost of BPF_PROG_TEST_RUN itself.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

int empty(struct __sk_buff *skb)
{
    return TC_ACT_UNSPEC;
}
