/* flowmon: per-flow aggregation on TC ingress and egress, an observer (always SLUICE_NEXT).
 *
 * One shared hash map (flowmon_flows) keyed by the flow tuple aggregates packets, bytes, times,
 * the TCP flags union, DSCP, MACs and the interfaces a flow was seen on. A packet forwarded
 * through this host is seen on two interfaces; only the interface that first saw the flow counts
 * it (the others are only listed), so nothing is counted twice. User space evicts the whole map
 * periodically (batched lookup-and-delete) and earlier when it nears full.
 *
 * Counted bytes are L3: the IP datagram (IPv4 total length, IPv6 40 + payload length), as IPFIX's
 * octetDeltaCount means, never the frame. A GSO/GRO packet counts as the segments it stands for
 * on the wire (gso_segs), each with its own copy of the IP and transport headers.
 *
 * A packet forwarded from one monitored interface to another is counted by the ingress hook
 * only: the egress hook never creates a flow for a packet whose ingress_ifindex is monitored
 * (flowmon_ifaces), so an eviction between the two hooks cannot count it twice, and a packet
 * lost at ingress (map full) stays lost once. Lost flows are counted once each: their keys go
 * to an LRU (flowmon_lost) and only a new key counts as a lost flow.
 *
 * Side features, all off the hot path for packets they do not concern:
 *   - TCP RTT from the handshake seen in TC (SYN to SYN-ACK of the reverse tuple), since fentry
 *     is unavailable on locked-down kernels;
 *   - DNS latency, rcode and query name over UDP and TCP (query/response id matching);
 *   - drops from the skb:kfree_skb tracepoint with the kernel's drop reason (FLOWMON_DROPS),
 *     only of packets on monitored interfaces in their namespace (flowmon_ifaces).
 *
 * Counters (flowmon_counters, per-CPU array) are indexed by FLOWMON_C_*; user space owns
 * FLOWMON_C_EVICTED and reads fill = INSERTED - EVICTED.
 */
#include <sluice/sluice.h>

#ifndef FLOWMON_MAX_FLOWS
#define FLOWMON_MAX_FLOWS 5000
#endif
#define FLOWMON_MAX_SEEN 4
#define FLOWMON_MAX_RULES 8
#define FLOWMON_QNAME_LEN 48
#define FLOWMON_MAX_REASONS 512
#define FLOWMON_MAX_IFACES 4096

#define FLOWMON_DIR_INGRESS 0
#define FLOWMON_DIR_EGRESS 1

/* TCP flag bits as netobserv exports them: the header's 8 bits, plus combinations seen on one
 * packet, which the union alone cannot tell apart. */
#define FLOWMON_SYN_ACK 0x100
#define FLOWMON_FIN_ACK 0x200
#define FLOWMON_RST_ACK 0x400

enum flowmon_counter {
    FLOWMON_C_INSERTED = 0,    /* flows created in the map */
    FLOWMON_C_MAP_FULL = 1,    /* packets that found the map full: not aggregated, counted here */
    FLOWMON_C_MAP_FULL_BYTES = 2, /* their L3 bytes */
    FLOWMON_C_MALFORMED = 3,   /* packets sluice_parse refused */
    FLOWMON_C_SAMPLED_OUT = 4, /* packets skipped by 1/N sampling */
    FLOWMON_C_FILTERED = 5,    /* packets rejected by filter rules */
    FLOWMON_C_EVICTED = 6,     /* written by user space only */
    FLOWMON_C_LOST_FLOWS = 7,  /* distinct flows of those packets (new keys in flowmon_lost) */
    FLOWMON_C_DROPS_FULL = 8,  /* in-scope drops not attributed to a flow: drop map full */
    FLOWMON_C_MAX = 16,
};

struct flowmon_key {
    __u8 saddr[16];
    __u8 daddr[16];
    __u16 sport; /* ICMP: type */
    __u16 dport; /* ICMP: code */
    __u8 proto;
    __u8 pad[3];
};

struct flowmon_flow {
    __u64 first_ns; /* CLOCK_MONOTONIC (coarse) */
    __u64 last_ns;
    __u64 packets;
    __u64 bytes;          /* L3 */
    __u64 rtt_ns;         /* TCP handshake RTT measured at this host (0: none) */
    __u64 dns_latency_ns; /* on a DNS response's flow: time since its query */
    __u32 if_first;
    __u32 if_seen[FLOWMON_MAX_SEEN];
    __u32 sampling;
    __u16 flags;          /* TCP flags union + FLOWMON_*_ACK */
    __u16 dns_id;
    __u16 dns_flags;      /* the DNS header's flags word: QR, opcode, rcode */
    __u8 dir_first;
    __u8 dir_seen[FLOWMON_MAX_SEEN];
    __u8 n_seen;
    __u8 dscp;
    __u8 src_mac[6];
    __u8 dst_mac[6];
    __u8 qname[FLOWMON_QNAME_LEN]; /* DNS query name in wire format (length-prefixed labels) */
};

/* One filter rule; user space precomputes masks. The first matching rule decides. */
struct flowmon_rule {
    __u8 addr[16]; /* one end of the flow must be in addr/mask */
    __u8 mask[16];
    __u8 peer[16]; /* ... and the other end in peer/peer_mask */
    __u8 peer_mask[16];
    __u16 port;  /* either port; 0: any */
    __u16 sport; /* 0: any */
    __u16 dport; /* 0: any */
    __u8 proto;  /* 0: any */
    __u8 direction; /* 0: any, 1: ingress, 2: egress */
    __u8 accept;
    __u8 pad[3];
    __u32 sampling; /* 0: the global one */
};

struct flowmon_cfg {
    __u32 sampling; /* 1/N; 0 and 1 capture every packet */
    __u32 n_rules;  /* 0: no filtering */
    __u32 dns_port; /* 53 */
    __u32 features; /* FLOWMON_F_* */
};
#define FLOWMON_F_RTT 0x1
#define FLOWMON_F_DNS 0x2
#define FLOWMON_F_INGRESS_COUNTS 0x4 /* every packet egress would capture, ingress captures too (no
                                        direction rules): forwarded packets are counted at ingress */

struct flowmon_dns_key {
    __u8 client[16];
    __u8 server[16];
    __u16 client_port;
    __u16 id;
    __u8 proto;
    __u8 pad[3];
};

/* Drops are kept per flow and reason: one record each. */
struct flowmon_drop_key {
    struct flowmon_key flow;
    __u32 reason; /* enum skb_drop_reason */
};

struct flowmon_drop {
    __u64 packets;
    __u64 bytes; /* L3 */
    __u64 last_ns;
    __u16 flags; /* TCP flags of the dropped packets (union) */
    __u8 pad[6];
};

SLUICE_MAP("hash", struct flowmon_key, struct flowmon_flow, flowmon_flows, FLOWMON_MAX_FLOWS);
SLUICE_MAP("percpu_array", u32, u64, flowmon_counters, FLOWMON_C_MAX);
SLUICE_MAP("array", u32, struct flowmon_cfg, flowmon_cfg, 1);
SLUICE_MAP("array", u32, struct flowmon_rule, flowmon_rules, FLOWMON_MAX_RULES);
SLUICE_MAP("lru_hash", struct flowmon_key, u64, flowmon_syn, 4096);
SLUICE_MAP("lru_hash", struct flowmon_dns_key, u64, flowmon_dns_pending, 4096);
SLUICE_MAP("hash", struct flowmon_drop_key, struct flowmon_drop, flowmon_drops, 4096);
/* The interfaces the agent attached to: ifindex -> inode number of their network namespace. */
SLUICE_MAP("hash", u32, u32, flowmon_ifaces, FLOWMON_MAX_IFACES);
/* Flows lost to a full flow map this period (user space clears it at eviction): value unused.
 * An LRU never refuses a key; it may forget one early (CPU-local free lists), hence the slack:
 * a forgotten flow that loses another packet would count as lost twice. */
#define FLOWMON_MAX_LOST (FLOWMON_MAX_FLOWS > 16384 ? FLOWMON_MAX_FLOWS : 16384)
SLUICE_MAP("lru_hash", struct flowmon_key, u8, flowmon_lost, FLOWMON_MAX_LOST);
SLUICE_MAP("percpu_array", u32, u64, flowmon_drop_reasons, FLOWMON_MAX_REASONS);

static __always_inline void flowmon_count(u32 index, u64 n)
{
    u64 *c = flowmon_counters.lookup(&index);
    if (c)
        *c += n; /* per-CPU slot */
}

static __always_inline int flowmon_masked_eq(const __u8 *a, const __u8 *net, const __u8 *mask)
{
    const __u32 *x = (const __u32 *)a, *n = (const __u32 *)net, *m = (const __u32 *)mask;
    return (x[0] & m[0]) == n[0] && (x[1] & m[1]) == n[1] && (x[2] & m[2]) == n[2] && (x[3] & m[3]) == n[3];
}

static __always_inline int flowmon_rule_matches(const struct flowmon_rule *r, const struct sluice_flow *f, u8 dir)
{
    if (r->proto && r->proto != f->proto)
        return 0;
    if (r->direction && r->direction != dir + 1)
        return 0;
    if (r->port && r->port != f->sport && r->port != f->dport)
        return 0;
    if (r->sport && r->sport != f->sport)
        return 0;
    if (r->dport && r->dport != f->dport)
        return 0;
    int fwd = flowmon_masked_eq(f->saddr, r->addr, r->mask) && flowmon_masked_eq(f->daddr, r->peer, r->peer_mask);
    int rev = flowmon_masked_eq(f->daddr, r->addr, r->mask) && flowmon_masked_eq(f->saddr, r->peer, r->peer_mask);
    return fwd || rev;
}

/* The sampling rate that applies to this packet, or 0 when a rule rejects it. */
static __always_inline u32 flowmon_filter(const struct flowmon_cfg *cfg, const struct sluice_flow *f, u8 dir)
{
    u32 n = cfg->n_rules;
    if (n == 0)
        return cfg->sampling;
#pragma unroll
    for (u32 i = 0; i < FLOWMON_MAX_RULES; i++) {
        if (i >= n)
            break;
        u32 idx = i;
        struct flowmon_rule *r = flowmon_rules.lookup(&idx);
        if (!r)
            break;
        if (flowmon_rule_matches(r, f, dir))
            return r->accept ? (r->sampling ? r->sampling : cfg->sampling ? cfg->sampling : 1) : 0;
    }
    return 0; /* rules configured and none matched: not captured */
}

static __always_inline u16 flowmon_tcp_flags(const struct sluice_flow *f)
{
    u16 flags = f->tcp_flags;
    if ((flags & 0x10) == 0)
        return flags;
    if (flags & 0x02)
        flags |= FLOWMON_SYN_ACK;
    if (flags & 0x01)
        flags |= FLOWMON_FIN_ACK;
    if (flags & 0x04)
        flags |= FLOWMON_RST_ACK;
    return flags;
}

static __always_inline void flowmon_key_set(struct flowmon_key *k, const __u8 *saddr, const __u8 *daddr,
                                            u16 sport, u16 dport, u8 proto)
{
    __builtin_memset(k, 0, sizeof(*k)); /* the padding is part of the hashed key */
    __builtin_memcpy(k->saddr, saddr, 16);
    __builtin_memcpy(k->daddr, daddr, 16);
    k->sport = sport;
    k->dport = dport;
    k->proto = proto;
}

/* A packet of a flow already in the map: count it on the flow's first interface, else list it. */
static __always_inline void flowmon_update(struct flowmon_flow *fl, u32 ifindex, u8 dir, u32 packets, u64 bytes,
                                           u64 now, u16 flags)
{
    if (fl->if_first == ifindex && fl->dir_first == dir) {
        __sync_fetch_and_add(&fl->packets, packets);
        __sync_fetch_and_add(&fl->bytes, bytes);
        if (fl->last_ns != now) /* coarse clock: changes every few ms, skip the store otherwise */
            fl->last_ns = now;
        if ((fl->flags | flags) != fl->flags)
            fl->flags |= flags; /* rare: a flag not seen yet on this flow */
        return;
    }
    u8 n = fl->n_seen;
#pragma unroll
    for (int i = 0; i < FLOWMON_MAX_SEEN; i++) {
        if (i >= n)
            break;
        if (fl->if_seen[i] == ifindex && fl->dir_seen[i] == dir)
            return;
    }
    if (n < FLOWMON_MAX_SEEN) {
        u32 slot = n & (FLOWMON_MAX_SEEN - 1);
        fl->if_seen[slot] = ifindex;
        fl->dir_seen[slot] = dir;
        fl->n_seen = n + 1;
    }
}

/* TCP RTT from the handshake: remember the SYN, measure at the SYN-ACK of the reverse tuple. */
static __always_inline void flowmon_rtt(const struct flowmon_key *k, u16 flags, struct flowmon_flow *fl)
{
    if ((flags & 0x02) == 0)
        return;
    u64 now = bpf_ktime_get_ns();
    if ((flags & 0x12) == 0x02) { /* SYN without ACK */
        flowmon_syn.insert((struct flowmon_key *)k, &now); /* first sighting wins: seen on two ifaces */
        return;
    }
    if ((flags & 0x12) != 0x12 || !fl)
        return;
    struct flowmon_key rev;
    flowmon_key_set(&rev, k->daddr, k->saddr, k->dport, k->sport, k->proto);
    u64 *syn = flowmon_syn.lookup(&rev);
    if (!syn)
        return;
    if (now > *syn)
        fl->rtt_ns = now - *syn;
    flowmon_syn.delete(&rev);
}

/* Where the DNS message starts in this packet, or 0 when it carries none. Over TCP the message
 * follows a 2-byte length and must start the segment (true of the usual one-segment messages). */
static __always_inline u32 flowmon_dns_offset(struct __sk_buff *skb, const struct sluice_pkt *pkt)
{
    if (pkt->flow.proto == IPPROTO_UDP)
        return pkt->l4_off + sizeof(struct udphdr);
    __u8 doff;
    if (bpf_skb_load_bytes(skb, pkt->l4_off + 12, &doff, 1) < 0)
        return 0;
    return pkt->l4_off + (doff >> 4) * 4 + 2;
}

/* DNS over UDP and TCP: a query stores its time by (client, server, id); the response measures. */
static __always_inline void flowmon_dns(struct __sk_buff *skb, const struct sluice_pkt *pkt, u32 dns_port,
                                        struct flowmon_flow *fl)
{
    const struct sluice_flow *f = &pkt->flow;
    if ((f->proto != IPPROTO_UDP && f->proto != IPPROTO_TCP) || (f->sport != dns_port && f->dport != dns_port))
        return;
    u32 off = flowmon_dns_offset(skb, pkt);
    if (off == 0 || skb->len < off + 12) /* no payload (SYN, bare ACK) or too short for a header */
        return;
    u64 now = bpf_ktime_get_ns();
    __u16 hdr[3];
    if (bpf_skb_load_bytes(skb, off, hdr, sizeof(hdr)) < 0)
        return;
    u16 id = bpf_ntohs(hdr[0]), dflags = bpf_ntohs(hdr[1]);
    int response = dflags & 0x8000;
    struct flowmon_dns_key dk;
    __builtin_memset(&dk, 0, sizeof(dk));
    dk.id = id;
    dk.proto = f->proto;
    if (response) {
        __builtin_memcpy(dk.client, f->daddr, 16);
        __builtin_memcpy(dk.server, f->saddr, 16);
        dk.client_port = f->dport;
    } else {
        __builtin_memcpy(dk.client, f->saddr, 16);
        __builtin_memcpy(dk.server, f->daddr, 16);
        dk.client_port = f->sport;
    }
    if (!response) {
        flowmon_dns_pending.insert(&dk, &now); /* NOEXIST: the first interface's time wins */
    } else {
        u64 *sent = flowmon_dns_pending.lookup(&dk);
        if (sent) {
            if (fl && now > *sent)
                fl->dns_latency_ns = now - *sent;
            flowmon_dns_pending.delete(&dk);
        }
    }
    if (!fl)
        return;
    fl->dns_id = id;
    fl->dns_flags = dflags;
    /* The question name follows the 12-byte header; copy what fits. */
    /* The question name follows the 12-byte header: copy the largest constant size that fits
     * (a variable length is hard to prove to the verifier and names are short). */
    u32 qoff = off + 12;
    if (skb->len >= qoff + 48)
        bpf_skb_load_bytes(skb, qoff, fl->qname, 48);
    else if (skb->len >= qoff + 32)
        bpf_skb_load_bytes(skb, qoff, fl->qname, 32);
    else if (skb->len >= qoff + 16)
        bpf_skb_load_bytes(skb, qoff, fl->qname, 16);
    else if (skb->len >= qoff + 8)
        bpf_skb_load_bytes(skb, qoff, fl->qname, 8);
}

/* What the packet was on the wire: its segments and their L3 bytes. A GSO packet carries one copy
 * of the headers for gso_segs segments; each segment repeats the IP header (with IPv6 extension
 * headers) and the TCP or UDP header. Other GSO kinds (tunnels) repeat their inner headers too,
 * which are not counted here (documented in docs/plugins/flowmon.md). */
static __always_inline u64 flowmon_wire_bytes(struct __sk_buff *skb, const struct sluice_pkt *pkt, u32 segs)
{
    u64 bytes = pkt->ip_len;
    if (segs <= 1)
        return bytes;
    u32 hdr = pkt->l4_off - pkt->l3_off;
    if (pkt->flow.proto == IPPROTO_TCP) {
        __u8 doff = 0;
        bpf_skb_load_bytes(skb, pkt->l4_off + 12, &doff, 1); /* the parser checked it is there */
        hdr += (doff >> 4) * 4;
    } else if (pkt->flow.proto == IPPROTO_UDP) {
        hdr += sizeof(struct udphdr);
    }
    return bytes + (u64)(segs - 1) * hdr;
}

static __always_inline int flowmon_monitored(u32 ifindex)
{
    return ifindex && flowmon_ifaces.lookup(&ifindex) != NULL;
}

/* The flow map is full: count the packet, and its flow once (the first time its key is seen). */
static __always_inline void flowmon_lost_packet(struct flowmon_key *k, u32 packets, u64 bytes)
{
    u8 one = 1;
    if (flowmon_lost.insert(k, &one) == 0)
        flowmon_count(FLOWMON_C_LOST_FLOWS, 1);
    flowmon_count(FLOWMON_C_MAP_FULL, packets);
    flowmon_count(FLOWMON_C_MAP_FULL_BYTES, bytes);
}

static __always_inline int flowmon_observe(struct __sk_buff *skb, u8 dir)
{
    struct sluice_pkt pkt;
    int parsed = sluice_parse(skb, &pkt);
    if (parsed == SLUICE_PARSE_NOT_IP)
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "not-ip");
    if (parsed != SLUICE_PARSE_OK) {
        flowmon_count(FLOWMON_C_MALFORMED, 1);
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "malformed");
    }
    u32 zero = 0;
    struct flowmon_cfg *cfg = flowmon_cfg.lookup(&zero);
    if (!cfg)
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "no-config");
    u32 sampling = flowmon_filter(cfg, &pkt.flow, dir);
    if (sampling == 0) {
        flowmon_count(FLOWMON_C_FILTERED, 1);
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "filtered");
    }
    if (sampling > 1 && bpf_get_prandom_u32() % sampling != 0) {
        flowmon_count(FLOWMON_C_SAMPLED_OUT, 1);
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "sampled-out");
    }

    struct flowmon_key key;
    flowmon_key_set(&key, pkt.flow.saddr, pkt.flow.daddr, pkt.flow.sport, pkt.flow.dport, pkt.flow.proto);
    /* Flow times need no better than the IPFIX millisecond: the coarse clock (same
     * CLOCK_MONOTONIC base) saves ~10 ns per packet. RTT and DNS take precise time themselves. */
    u64 now = bpf_ktime_get_coarse_ns();
    u32 segs = skb->gso_segs;
    u32 packets = segs > 1 ? segs : 1;
    u64 bytes = flowmon_wire_bytes(skb, &pkt, segs);
    u16 flags = pkt.flow.proto == IPPROTO_TCP ? flowmon_tcp_flags(&pkt.flow) : 0;

    struct flowmon_flow *fl = flowmon_flows.lookup(&key);
    if (fl) {
        flowmon_update(fl, skb->ifindex, dir, packets, bytes, now, flags);
    } else if (dir == FLOWMON_DIR_EGRESS && (cfg->features & FLOWMON_F_INGRESS_COUNTS) &&
               flowmon_monitored(skb->ingress_ifindex)) {
        /* Came in on a monitored interface: its ingress hook counted it, in a flow evicted since
         * or as lost. Creating the flow here would count the packet twice. */
    } else {
        struct flowmon_flow init;
        __builtin_memset(&init, 0, sizeof(init));
        init.first_ns = now;
        init.last_ns = now;
        init.packets = packets;
        init.bytes = bytes;
        init.if_first = skb->ifindex;
        init.dir_first = dir;
        init.sampling = sampling;
        init.flags = flags;
        init.dscp = pkt.dscp;
        void *data = (void *)(long)skb->data;
        void *data_end = (void *)(long)skb->data_end;
        struct ethhdr *eth = data;
        if ((void *)(eth + 1) <= data_end) {
            __builtin_memcpy(init.dst_mac, eth->h_dest, 6);
            __builtin_memcpy(init.src_mac, eth->h_source, 6);
        }
        int err = flowmon_flows.insert(&key, &init); /* NOEXIST: another CPU may have won */
        if (err == 0) {
            flowmon_count(FLOWMON_C_INSERTED, 1);
            fl = flowmon_flows.lookup(&key);
        } else {
            fl = flowmon_flows.lookup(&key);
            if (fl) /* -EEXIST: created meanwhile, count on it */
                flowmon_update(fl, skb->ifindex, dir, packets, bytes, now, flags);
            else /* -E2BIG: full; user space sees the counter and evicts at once */
                flowmon_lost_packet(&key, packets, bytes);
        }
    }
    if (cfg->features & FLOWMON_F_RTT && pkt.flow.proto == IPPROTO_TCP)
        flowmon_rtt(&key, flags, fl);
    if (cfg->features & FLOWMON_F_DNS)
        flowmon_dns(skb, &pkt, cfg->dns_port, fl);
    return sluice_verdict(skb, &pkt, SLUICE_NEXT, "observed");
}

int flowmon_ingress(struct __sk_buff *skb)
{
    return flowmon_observe(skb, FLOWMON_DIR_INGRESS);
}

int flowmon_egress(struct __sk_buff *skb)
{
    return flowmon_observe(skb, FLOWMON_DIR_EGRESS);
}

#ifdef FLOWMON_DROPS
/* The tracepoint's generated args struct names this enum; its values come from tracefs (drops.py).
 * Declared here so no kernel header (possibly of another kernel version) is needed. */
enum skb_drop_reason { FLOWMON_SKB_DROP_REASON_U32 = 0x7fffffff };

/* Drops: skb:kfree_skb with the kernel's reason. The skb's headers are read with probe reads
 * (a tracepoint has no packet context). Only drops of packets on the monitored interfaces count:
 * the skb's device (or, once the device is gone, its socket) must be in the namespace the
 * interface was attached in, and the device or the packet's input interface must be one of them.
 * struct offsets come from the running kernel's BTF (btf.py), not from headers. */
static __always_inline u32 flowmon_netns_inum(void *net)
{
    u32 inum = 0;
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), net + FLOWMON_NET_INUM);
    return inum;
}

static __always_inline int flowmon_iface_in(u32 ifindex, u32 inum)
{
    if (!ifindex || !inum)
        return 0;
    u32 *ns = flowmon_ifaces.lookup(&ifindex);
    return ns && *ns == inum;
}

static __always_inline int flowmon_drop_in_scope(void *skb)
{
    void *dev = NULL, *net = NULL;
    u32 ifindex = 0, iif = 0;
    bpf_probe_read_kernel(&dev, sizeof(dev), skb + FLOWMON_SKB_DEV);
    bpf_probe_read_kernel(&iif, sizeof(iif), skb + FLOWMON_SKB_IIF);
    if (dev) {
        bpf_probe_read_kernel(&net, sizeof(net), dev + FLOWMON_DEV_NET);
        bpf_probe_read_kernel(&ifindex, sizeof(ifindex), dev + FLOWMON_DEV_IFINDEX);
        u32 inum = flowmon_netns_inum(net);
        if (flowmon_iface_in(ifindex, inum) || flowmon_iface_in(iif, inum))
            return 1;
    }
    /* Delivered to a socket: skb->dev may be cleared (or reused as scratch); the socket knows. */
    void *sk = NULL;
    bpf_probe_read_kernel(&sk, sizeof(sk), skb + FLOWMON_SKB_SK);
    if (!sk)
        return 0;
    bpf_probe_read_kernel(&net, sizeof(net), sk + FLOWMON_SK_NET);
    return flowmon_iface_in(iif, flowmon_netns_inum(net));
}

static __always_inline int flowmon_drop_flow(struct flowmon_key *k, u16 *tcp_flags, u32 *ip_len,
                                             unsigned char *head, u16 nh, u16 protocol)
{
    __builtin_memset(k, 0, sizeof(*k));
    u32 l4 = 0;
    if (protocol == ETH_P_IP) {
        struct iphdr ip;
        if (bpf_probe_read_kernel(&ip, sizeof(ip), head + nh) < 0 || ip.version != 4 || ip.ihl < 5)
            return -1;
        sluice_v4_mapped(k->saddr, ip.saddr);
        sluice_v4_mapped(k->daddr, ip.daddr);
        k->proto = ip.protocol;
        *ip_len = bpf_ntohs(ip.tot_len);
        if (bpf_ntohs(ip.frag_off) & 0x1fff)
            return 0; /* later fragment: no ports */
        l4 = nh + ip.ihl * 4;
    } else if (protocol == ETH_P_IPV6) {
        struct ipv6hdr ip6;
        if (bpf_probe_read_kernel(&ip6, sizeof(ip6), head + nh) < 0 || ip6.version != 6)
            return -1;
        __builtin_memcpy(k->saddr, &ip6.saddr, 16);
        __builtin_memcpy(k->daddr, &ip6.daddr, 16);
        *ip_len = bpf_ntohs(ip6.payload_len) + sizeof(ip6);
        /* the extension headers the TC parser walks (sluice/parse.h), so the key is the same */
        __u8 next = ip6.nexthdr;
        l4 = nh + sizeof(ip6);
#pragma unroll
        for (int i = 0; i < SLUICE_MAX_IPV6_EXT; i++) {
            if (!sluice_ipv6_ext_generic(next) && next != IPPROTO_AH && next != IPPROTO_FRAGMENT)
                break;
            __u8 ext[4];
            if (bpf_probe_read_kernel(ext, sizeof(ext), head + l4) < 0)
                return -1;
            if (next == IPPROTO_FRAGMENT) {
                next = ext[0];
                if (((ext[2] << 8) | ext[3]) & 0xfff8) { /* a later fragment: no ports */
                    k->proto = next;
                    return 0;
                }
                l4 += 8;
            } else if (next == IPPROTO_AH) {
                next = ext[0];
                l4 += (ext[1] + 2) * 4;
            } else {
                next = ext[0];
                l4 += (ext[1] + 1) * 8;
            }
        }
        if (sluice_ipv6_ext_generic(next) || next == IPPROTO_AH || next == IPPROTO_FRAGMENT)
            return -1; /* a longer chain than TC walks: TC called it malformed, no flow either */
        k->proto = next;
    } else {
        return -1;
    }
    __u8 hdr[14];
    if (bpf_probe_read_kernel(hdr, sizeof(hdr), head + l4) < 0)
        return 0;
    if (k->proto == IPPROTO_TCP || k->proto == IPPROTO_UDP) {
        k->sport = (hdr[0] << 8) | hdr[1];
        k->dport = (hdr[2] << 8) | hdr[3];
        if (k->proto == IPPROTO_TCP)
            *tcp_flags = hdr[13];
    } else if (k->proto == IPPROTO_ICMP || k->proto == IPPROTO_ICMPV6) {
        k->sport = hdr[0];
        k->dport = hdr[1];
    }
    return 0;
}

int flowmon_kfree_skb(struct tracepoint__skb__kfree_skb *args)
{
    u32 reason = (u32)args->reason;
    if (reason < 2) /* NOT_DROPPED_YET, CONSUMED */
        return 0;
    void *skb = args->skbaddr;
    if (!flowmon_drop_in_scope(skb))
        return 0;
    u32 slot = reason < FLOWMON_MAX_REASONS ? reason : FLOWMON_MAX_REASONS - 1;
    u64 *count = flowmon_drop_reasons.lookup(&slot);
    if (count)
        *count += 1;

    unsigned char *head = NULL;
    u16 nh = 0;
    bpf_probe_read_kernel(&head, sizeof(head), skb + FLOWMON_SKB_HEAD);
    bpf_probe_read_kernel(&nh, sizeof(nh), skb + FLOWMON_SKB_NETWORK_HEADER);
    if (!head || nh == (u16)~0U)
        return 0;
    struct flowmon_drop_key k;
    __builtin_memset(&k, 0, sizeof(k));
    u16 tcp_flags = 0;
    u32 len = 0; /* the IP length: the skb's own may have lost pulled headers by now */
    if (flowmon_drop_flow(&k.flow, &tcp_flags, &len, head, nh, args->protocol) < 0)
        return 0;
    k.reason = reason;
    u64 now = bpf_ktime_get_ns();
    struct flowmon_drop *d = flowmon_drops.lookup(&k);
    if (!d) {
        struct flowmon_drop init;
        __builtin_memset(&init, 0, sizeof(init));
        if (flowmon_drops.insert(&k, &init) != 0 && !flowmon_drops.lookup(&k)) {
            flowmon_count(FLOWMON_C_DROPS_FULL, 1);
            return 0;
        }
        d = flowmon_drops.lookup(&k);
        if (!d)
            return 0;
    }
    __sync_fetch_and_add(&d->packets, 1);
    __sync_fetch_and_add(&d->bytes, len);
    d->last_ns = now;
    if ((d->flags | tcp_flags) != d->flags)
        d->flags |= tcp_flags;
    return 0;
}
#endif
