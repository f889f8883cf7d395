// Maps declared through BCC, for checking Map.from_bcc against BCC's own view of them.
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

struct flow_key {
    u32 saddr;
    u32 daddr;
    u16 sport;
    u16 dport;
    u8 proto;
    u8 pad[3];
};

struct flow_stats {
    u64 packets;
    u64 bytes;
};

BPF_HASH(flows, struct flow_key, struct flow_stats, 1024);
BPF_PERCPU_ARRAY(drops, u32, 4);

// BCC creates maps when it loads the module; a program keeps the file a valid BPF module.
int noop(struct __sk_buff *skb)
{
    return TC_ACT_UNSPEC;
}
