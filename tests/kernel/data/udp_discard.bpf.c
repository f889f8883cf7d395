// Drop UDP to port 9 (discard), leave everything else to the next program: a minimal TC verdict
// for testing BPF_PROG_TEST_RUN. Truncated headers are never dropped.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>

int udp_discard(struct __sk_buff *skb)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
        return TC_ACT_UNSPEC;

    struct iphdr *ip = (void *)(eth + 1);
    if ((void *)(ip + 1) > data_end || ip->protocol != IPPROTO_UDP || ip->ihl < 5)
        return TC_ACT_UNSPEC;
    if (ip->frag_off & bpf_htons(0x1fff))  // a later fragment has no UDP header
        return TC_ACT_UNSPEC;

    struct udphdr *udp = (void *)ip + ip->ihl * 4;
    if ((void *)(udp + 1) > data_end)
        return TC_ACT_UNSPEC;
    return udp->dest == bpf_htons(9) ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}
