/* sluice/parse.h: bounded packet parsing into one flow description, done once per packet.
 *
 * Addresses are 16 bytes; IPv4 is stored v4-mapped (::ffff:a.b.c.d) so one key and one LPM trie
 * serve both families. Every read is bounds-checked against data_end (for the verifier) and
 * against the end of the IP datagram (IPv4 tot_len, IPv6 payload_len: bytes after it are padding
 * the receiver trims, never headers); anything malformed yields SLUICE_PARSE_MALFORMED and the
 * caller decides (policy programs fail closed, observers count).
 *
 * Parse once: the core's prologue (core/bpf/prologue.bpf.c), first on every hook sluice manages,
 * parses each packet into this CPU's slot of the core map sluice_pkt_ctx and stamps skb->cb[4]
 * with the slot's sequence number. sluice_parse() and sluice_packet() use that result when the
 * stamp, the interface and the length agree (docs/architecture.md, "Parse once"), and parse
 * themselves otherwise, so a program works the same with or without the prologue.
 */
#ifndef SLUICE_PARSE_H
#define SLUICE_PARSE_H

#include <sluice/common.h>
#include <sluice/maps.h>

#define SLUICE_MAX_VLAN 2
#define SLUICE_MAX_IPV6_EXT 6
#define SLUICE_CB_STAMP 4 /* skb->cb[4] is the core's; cb[0..3] stay free for plugins */

enum sluice_parse_result {
    SLUICE_PARSE_OK = 0,
    SLUICE_PARSE_NOT_IP = 1,    /* ARP, LLDP, ...: not our business */
    SLUICE_PARSE_MALFORMED = 2, /* truncated or inconsistent headers */
};

#define SLUICE_F_FRAGMENT 0x1   /* any fragment of a fragmented datagram (frag_id names it) */
#define SLUICE_F_LATER_FRAG 0x2 /* a non-first fragment: no L4 header, ports 0, proto unverified */

struct sluice_flow {
    __u8 saddr[16];
    __u8 daddr[16];
    __u16 sport; /* host order; ICMP: type in sport, code in dport */
    __u16 dport;
    __u8 proto;  /* IPPROTO_* of the transport (after IPv6 extension headers); for a non-first
                    fragment the sender's word only (IPv4 protocol / fragment header next-header) */
    __u8 family; /* 4 or 6 */
    __u8 tcp_flags;
    __u8 flags; /* SLUICE_F_* */
};

struct sluice_pkt {
    struct sluice_flow flow;
    __u16 l3_off;  /* from the start of the frame */
    __u16 l4_off;  /* a non-first fragment: where its payload starts */
    __u16 vlan_id; /* outermost tag, 0 when untagged */
    __u8 dscp;
    __u8 ttl;
    __u32 ip_len;        /* IP total length (payload length + 40 for IPv6): the datagram ends at
                            l3_off + ip_len, reads beyond it are not part of the packet */
    __u32 frag_id;       /* fragments: IPv4 identification or IPv6 fragment identification */
    __u32 flow_hash;     /* addresses, ports (0 for ICMP), protocol: one direction */
    __u32 flow_hash_sym; /* the same for both directions of a flow */
};

/* This CPU's parse of the packet going through the chain now. TC programs of one hook run on
 * one CPU without preemption, so between the prologue and the last program nothing else writes
 * the slot, except a nested chain (bpf_clone_redirect), which moves seq on and so invalidates
 * the stamp of the outer packet. */
struct sluice_pkt_ctx {
    __u32 seq; /* the stamp the prologue wrote to skb->cb[SLUICE_CB_STAMP]; 0 is never valid */
    __u32 ifindex;
    __u32 len;
    __s32 result; /* enum sluice_parse_result */
    struct sluice_pkt pkt;
};

SLUICE_CORE_MAP("percpu_array", u32, struct sluice_pkt_ctx, sluice_pkt_ctx, 1);

static __always_inline void sluice_v4_mapped(__u8 out[16], __be32 addr)
{
    __builtin_memset(out, 0, 10);
    out[10] = 0xff;
    out[11] = 0xff;
    __builtin_memcpy(out + 12, &addr, 4);
}

static __always_inline int sluice_is_v4_mapped(const __u8 a[16])
{
    return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0 && a[4] == 0 && a[5] == 0 && a[6] == 0 &&
           a[7] == 0 && a[8] == 0 && a[9] == 0 && a[10] == 0xff && a[11] == 0xff;
}

/* IPv6 extension headers with the common (next, length in 8-byte units) layout: hop-by-hop,
 * routing, destination options, mobility, HIP, shim6. */
static __always_inline int sluice_ipv6_ext_generic(__u8 next)
{
    return next == IPPROTO_HOPOPTS || next == IPPROTO_ROUTING || next == IPPROTO_DSTOPTS || next == 135 ||
           next == 139 || next == 140;
}

/* The smallest transport header a first fragment must carry whole, and that a later fragment's
 * offset may not reach into (an overlap rewriting ports or flags is an attack, RFC 1858/3128). */
static __always_inline __u32 sluice_min_l4(__u8 proto)
{
    if (proto == IPPROTO_TCP)
        return 20;
    if (proto == IPPROTO_UDP || proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6)
        return 8;
    return 0;
}

/* The transport header at off; the datagram ends at l3_end (offsets from the frame's start). */
static __always_inline int sluice_parse_l4_bounded(void *data, void *data_end, struct sluice_pkt *pkt,
                                                   __u32 off, __u32 l3_end)
{
    struct sluice_flow *f = &pkt->flow;
    pkt->l4_off = off;
    if (f->flags & SLUICE_F_LATER_FRAG)
        return SLUICE_PARSE_OK;
    if (off + sluice_min_l4(f->proto) > l3_end)
        return SLUICE_PARSE_MALFORMED; /* a (first fragment's) transport header cut short */
    if (f->proto == IPPROTO_TCP) {
        struct tcphdr *th = data + off;
        if ((void *)(th + 1) > data_end)
            return SLUICE_PARSE_MALFORMED;
        if (th->doff < 5 || off + th->doff * 4 > l3_end)
            return SLUICE_PARSE_MALFORMED;
        f->sport = bpf_ntohs(th->source);
        f->dport = bpf_ntohs(th->dest);
        f->tcp_flags = ((__u8 *)th)[13];
    } else if (f->proto == IPPROTO_UDP) {
        struct udphdr *uh = data + off;
        if ((void *)(uh + 1) > data_end)
            return SLUICE_PARSE_MALFORMED;
        __u32 ulen = bpf_ntohs(uh->len); /* a first fragment's UDP length covers the datagram */
        if (!(f->flags & SLUICE_F_FRAGMENT) && (ulen < 8 || off + ulen > l3_end))
            return SLUICE_PARSE_MALFORMED;
        f->sport = bpf_ntohs(uh->source);
        f->dport = bpf_ntohs(uh->dest);
    } else if (f->proto == IPPROTO_ICMP || f->proto == IPPROTO_ICMPV6) {
        __u8 *icmp = data + off; /* every ICMP message has an 8-byte header (id/seq, MTU, ...) */
        if ((void *)(icmp + 8) > data_end)
            return SLUICE_PARSE_MALFORMED;
        f->sport = icmp[0];
        f->dport = icmp[1];
    }
    return SLUICE_PARSE_OK;
}

/* Bounded by the frame only: for headers whose datagram length the caller checked itself. */
static __always_inline int sluice_parse_l4(void *data, void *data_end, struct sluice_pkt *pkt, __u32 off)
{
    return sluice_parse_l4_bounded(data, data_end, pkt, off, (__u32)(data_end - data));
}

static __always_inline __u32 sluice_rotl(__u32 x, int r)
{
    return (x << r) | (x >> (32 - r));
}

static __always_inline __u32 sluice_mix(__u32 h, __u32 k) /* murmur3's block step */
{
    k *= 0xcc9e2d51;
    k = sluice_rotl(k, 15);
    k *= 0x1b873593;
    h ^= k;
    h = sluice_rotl(h, 13);
    return h * 5 + 0xe6546b64;
}

static __always_inline __u32 sluice_fmix(__u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    return h ^ (h >> 16);
}

static __always_inline __u32 sluice_endpoint_hash(const __u8 *addr, __u16 port)
{
    const __u32 *w = (const __u32 *)addr;
    __u32 h = sluice_mix(sluice_mix(sluice_mix(sluice_mix(0x51c3, w[0]), w[1]), w[2]), w[3]);
    return sluice_fmix(sluice_mix(h, port));
}

/* The flow identity: not keyed, so a map keyed by it must still compare the whole tuple. */
static __always_inline void sluice_flow_hashes(struct sluice_pkt *pkt)
{
    struct sluice_flow *f = &pkt->flow;
    int ports = f->proto != IPPROTO_ICMP && f->proto != IPPROTO_ICMPV6;
    __u32 s = sluice_endpoint_hash(f->saddr, ports ? f->sport : 0);
    __u32 d = sluice_endpoint_hash(f->daddr, ports ? f->dport : 0);
    pkt->flow_hash = sluice_fmix(sluice_mix(sluice_mix(s, d), f->proto));
    pkt->flow_hash_sym = sluice_fmix(sluice_mix(s + d, f->proto)); /* + commutes: both directions */
}

static __always_inline int sluice_parse_ipv4(struct __sk_buff *skb, void *data, void *data_end,
                                             struct sluice_pkt *pkt, __u32 off)
{
    struct sluice_flow *f = &pkt->flow;
    struct iphdr *ip = data + off;
    if ((void *)(ip + 1) > data_end)
        return SLUICE_PARSE_MALFORMED;
    if (ip->version != 4 || ip->ihl < 5)
        return SLUICE_PARSE_MALFORMED;
    __u32 hlen = ip->ihl * 4;
    if (data + off + hlen > data_end)
        return SLUICE_PARSE_MALFORMED;
    f->family = 4;
    f->proto = ip->protocol;
    sluice_v4_mapped(f->saddr, ip->saddr);
    sluice_v4_mapped(f->daddr, ip->daddr);
    pkt->dscp = ip->tos >> 2;
    pkt->ttl = ip->ttl;
    __u32 tot = bpf_ntohs(ip->tot_len);
    if (tot == 0 && skb->gso_size) /* BIG TCP: a GSO packet over 64 KiB says 0 */
        tot = skb->len - off;
    pkt->ip_len = tot;
    /* skb->len, not data_end: a GRO packet's payload may sit in pages beyond the linear part */
    if (tot < hlen || off + tot > skb->len)
        return SLUICE_PARSE_MALFORMED; /* claims less than its header, or more than it carries */
    __u16 frag = bpf_ntohs(ip->frag_off);
    if (frag & 0x3fff) { /* MF set or offset non-zero */
        f->flags |= SLUICE_F_FRAGMENT;
        pkt->frag_id = bpf_ntohs(ip->id);
    }
    if (frag & 0x1fff) {
        f->flags |= SLUICE_F_LATER_FRAG;
        if ((frag & 0x1fff) * 8 < sluice_min_l4(f->proto))
            return SLUICE_PARSE_MALFORMED; /* overlaps the transport header */
    }
    return sluice_parse_l4_bounded(data, data_end, pkt, off + hlen, off + tot);
}

static __always_inline int sluice_parse_ipv6(struct __sk_buff *skb, void *data, void *data_end,
                                             struct sluice_pkt *pkt, __u32 off)
{
    struct sluice_flow *f = &pkt->flow;
    struct ipv6hdr *ip6 = data + off;
    if ((void *)(ip6 + 1) > data_end)
        return SLUICE_PARSE_MALFORMED;
    if (ip6->version != 6)
        return SLUICE_PARSE_MALFORMED;
    f->family = 6;
    __builtin_memcpy(f->saddr, &ip6->saddr, 16);
    __builtin_memcpy(f->daddr, &ip6->daddr, 16);
    pkt->dscp = ((ip6->priority << 4) | (ip6->flow_lbl[0] >> 4)) >> 2;
    pkt->ttl = ip6->hop_limit;
    __u32 plen = bpf_ntohs(ip6->payload_len);
    if (plen == 0 && skb->gso_size) /* BIG TCP */
        plen = skb->len - off - sizeof(*ip6);
    pkt->ip_len = plen + sizeof(*ip6);
    __u32 l3_end = off + sizeof(*ip6) + plen;
    if (l3_end > skb->len)
        return SLUICE_PARSE_MALFORMED; /* claims more than it carries */
    __u8 next = ip6->nexthdr;
    off += sizeof(*ip6);
#pragma unroll
    for (int i = 0; i < SLUICE_MAX_IPV6_EXT; i++) {
        if (f->flags & SLUICE_F_LATER_FRAG)
            break; /* after a non-first fragment header comes payload, not headers */
        if (sluice_ipv6_ext_generic(next)) {
            if (next == IPPROTO_HOPOPTS && i > 0)
                return SLUICE_PARSE_MALFORMED; /* hop-by-hop comes first or not at all */
            __u8 *ext = data + off;
            if ((void *)(ext + 2) > data_end || off + 8 > l3_end)
                return SLUICE_PARSE_MALFORMED;
            next = ext[0];
            off += (ext[1] + 1) * 8;
        } else if (next == IPPROTO_AH) {
            __u8 *ext = data + off; /* AH counts its length in 4-byte words, minus 2 */
            if ((void *)(ext + 2) > data_end || off + 12 > l3_end)
                return SLUICE_PARSE_MALFORMED;
            next = ext[0];
            off += (ext[1] + 2) * 4;
        } else if (next == IPPROTO_FRAGMENT) {
            __u8 *ext = data + off;
            if ((void *)(ext + 8) > data_end || off + 8 > l3_end)
                return SLUICE_PARSE_MALFORMED;
            if (f->flags & SLUICE_F_FRAGMENT)
                return SLUICE_PARSE_MALFORMED; /* a second fragment header */
            next = ext[0];
            __u16 offset = ((ext[2] << 8) | ext[3]) & 0xfff8; /* in bytes */
            if (offset || (ext[3] & 1)) {                     /* else an atomic fragment: whole */
                f->flags |= SLUICE_F_FRAGMENT;
                pkt->frag_id = ((__u32)ext[4] << 24) | ((__u32)ext[5] << 16) | ((__u32)ext[6] << 8) | ext[7];
            }
            if (offset) {
                f->flags |= SLUICE_F_LATER_FRAG;
                if (offset < sluice_min_l4(next))
                    return SLUICE_PARSE_MALFORMED; /* overlaps the transport header */
            }
            off += 8;
        } else {
            break;
        }
        if (off > l3_end)
            return SLUICE_PARSE_MALFORMED; /* an extension header longer than the payload */
    }
    if (!(f->flags & SLUICE_F_LATER_FRAG) &&
        (sluice_ipv6_ext_generic(next) || next == IPPROTO_AH || next == IPPROTO_FRAGMENT))
        return SLUICE_PARSE_MALFORMED; /* longer chain than we walk: treat as hostile */
    f->proto = next;
    return sluice_parse_l4_bounded(data, data_end, pkt, off, l3_end);
}

/* Parse the frame in skb into pkt, ignoring any earlier result. Returns a sluice_parse_result. */
static __always_inline int sluice_parse_frame(struct __sk_buff *skb, struct sluice_pkt *pkt)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    __builtin_memset(pkt, 0, sizeof(*pkt));

    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return SLUICE_PARSE_MALFORMED;
    __u16 proto = eth->h_proto;
    __u32 off = sizeof(*eth);
    if (skb->vlan_present) /* TC sees an offloaded outer tag in the skb, not in the frame */
        pkt->vlan_id = skb->vlan_tci & 0x0fff;

#pragma unroll
    for (int i = 0; i < SLUICE_MAX_VLAN; i++) {
        if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
            break;
        __u16 *tag = data + off; /* TCI, then the encapsulated protocol */
        if ((void *)(tag + 2) > data_end)
            return SLUICE_PARSE_MALFORMED;
        if (!pkt->vlan_id)
            pkt->vlan_id = bpf_ntohs(tag[0]) & 0x0fff;
        proto = tag[1];
        off += 4;
    }
    if (proto == bpf_htons(ETH_P_8021Q) || proto == bpf_htons(ETH_P_8021AD))
        return SLUICE_PARSE_MALFORMED; /* more tags than we walk: treat as hostile */
    pkt->l3_off = off;

    int r = SLUICE_PARSE_NOT_IP;
    if (proto == bpf_htons(ETH_P_IP))
        r = sluice_parse_ipv4(skb, data, data_end, pkt, off);
    else if (proto == bpf_htons(ETH_P_IPV6))
        r = sluice_parse_ipv6(skb, data, data_end, pkt, off);
    if (r == SLUICE_PARSE_OK)
        sluice_flow_hashes(pkt);
    return r;
}

static __always_inline int sluice_ctx_valid(struct __sk_buff *skb, const struct sluice_pkt_ctx *c)
{
    return c->seq && c->seq == skb->cb[SLUICE_CB_STAMP] && c->ifindex == skb->ifindex && c->len == skb->len;
}

/* Parse into this CPU's slot and stamp the packet: later programs of the chain reuse it. */
static __always_inline int sluice_publish(struct __sk_buff *skb, struct sluice_pkt_ctx *c)
{
    c->result = sluice_parse_frame(skb, &c->pkt);
    __u32 seq = c->seq + 1;
    if (c->seq == 0) /* this CPU's first packet: start anywhere, so CPUs' stamps differ */
        seq = bpf_get_prandom_u32();
    c->seq = seq ? seq : 1;
    c->ifindex = skb->ifindex;
    c->len = skb->len;
    skb->cb[SLUICE_CB_STAMP] = c->seq;
    return c->result;
}

/* Zero-copy: the packet's parse, valid until this program ends (or calls bpf_clone_redirect).
 * Read it, never write it: later programs read the same slot. *result is a sluice_parse_result;
 * NULL only if the per-CPU slot is missing, which cannot happen (the verifier wants the check). */
static __always_inline const struct sluice_pkt *sluice_packet(struct __sk_buff *skb, int *result)
{
    __u32 zero = 0;
    struct sluice_pkt_ctx *c = sluice_pkt_ctx.lookup(&zero);
    if (!c) {
        *result = SLUICE_PARSE_MALFORMED;
        return NULL;
    }
    *result = sluice_ctx_valid(skb, c) ? c->result : sluice_publish(skb, c);
    return &c->pkt;
}

/* Fill pkt with the packet's parse (a copy the program may change). Returns a sluice_parse_result. */
static __always_inline int sluice_parse(struct __sk_buff *skb, struct sluice_pkt *pkt)
{
    __u32 zero = 0;
    struct sluice_pkt_ctx *c = sluice_pkt_ctx.lookup(&zero);
    if (!c)
        return sluice_parse_frame(skb, pkt);
    int r = sluice_ctx_valid(skb, c) ? c->result : sluice_publish(skb, c);
    __builtin_memcpy(pkt, &c->pkt, sizeof(*pkt));
    return r;
}

/* Call after changing the packet (addresses, ports, encapsulation) when the chain goes on: the
 * programs after this one parse the new packet instead of trusting the old parse. */
static __always_inline void sluice_packet_changed(struct __sk_buff *skb)
{
    skb->cb[SLUICE_CB_STAMP] = 0;
}

#endif
