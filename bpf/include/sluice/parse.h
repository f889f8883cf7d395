/* sluice/parse.h: bounded packet parsing into one flow description.
 *
 * Addresses are 16 bytes; IPv4 is stored v4-mapped (::ffff:a.b.c.d) so one key and one LPM trie
 * serve both families. Every read is bounds-checked against data_end; anything malformed yields
 * SLUICE_PARSE_MALFORMED and the caller decides (policy programs fail closed, observers count).
 */
#ifndef SLUICE_PARSE_H
#define SLUICE_PARSE_H

#include <sluice/common.h>

#define SLUICE_MAX_VLAN 2
#define SLUICE_MAX_IPV6_EXT 6

enum sluice_parse_result {
    SLUICE_PARSE_OK = 0,
    SLUICE_PARSE_NOT_IP = 1,    /* ARP, LLDP, ...: not our business */
    SLUICE_PARSE_MALFORMED = 2, /* truncated or inconsistent headers */
};

#define SLUICE_F_FRAGMENT 0x1  /* any fragment of a fragmented datagram */
#define SLUICE_F_LATER_FRAG 0x2 /* a non-first fragment: no L4 header, ports are 0 */

struct sluice_flow {
    __u8 saddr[16];
    __u8 daddr[16];
    __u16 sport; /* host order; ICMP: type in sport, code in dport */
    __u16 dport;
    __u8 proto;  /* IPPROTO_* of the transport (after IPv6 extension headers) */
    __u8 family; /* 4 or 6 */
    __u8 tcp_flags;
    __u8 flags; /* SLUICE_F_* */
};

struct sluice_pkt {
    struct sluice_flow flow;
    __u16 l3_off;  /* from the start of the frame */
    __u16 l4_off;
    __u16 vlan_id; /* outermost tag, 0 when untagged */
    __u8 dscp;
    __u8 ttl;
    __u32 ip_len; /* IP total length as the header says (payload length + 40 for IPv6) */
};

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

static __always_inline int sluice_parse_l4(void *data, void *data_end, struct sluice_pkt *pkt, __u32 off)
{
    struct sluice_flow *f = &pkt->flow;
    pkt->l4_off = off;
    if (f->flags & SLUICE_F_LATER_FRAG)
        return SLUICE_PARSE_OK;
    if (f->proto == IPPROTO_TCP) {
        struct tcphdr *th = data + off;
        if ((void *)(th + 1) > data_end)
            return SLUICE_PARSE_MALFORMED;
        if (th->doff < 5)
            return SLUICE_PARSE_MALFORMED;
        f->sport = bpf_ntohs(th->source);
        f->dport = bpf_ntohs(th->dest);
        f->tcp_flags = ((__u8 *)th)[13];
    } else if (f->proto == IPPROTO_UDP) {
        struct udphdr *uh = data + off;
        if ((void *)(uh + 1) > data_end)
            return SLUICE_PARSE_MALFORMED;
        f->sport = bpf_ntohs(uh->source);
        f->dport = bpf_ntohs(uh->dest);
    } else if (f->proto == IPPROTO_ICMP || f->proto == IPPROTO_ICMPV6) {
        __u8 *icmp = data + off;
        if ((void *)(icmp + 4) > data_end)
            return SLUICE_PARSE_MALFORMED;
        f->sport = icmp[0];
        f->dport = icmp[1];
    }
    return SLUICE_PARSE_OK;
}

/* Parse the frame in skb into pkt. Returns a sluice_parse_result. */
static __always_inline int sluice_parse(struct __sk_buff *skb, struct sluice_pkt *pkt)
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
    pkt->l3_off = off;

    struct sluice_flow *f = &pkt->flow;
    if (proto == bpf_htons(ETH_P_IP)) {
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
        pkt->ip_len = bpf_ntohs(ip->tot_len);
        __u16 frag = bpf_ntohs(ip->frag_off);
        if (frag & 0x3fff) /* MF set or offset non-zero */
            f->flags |= SLUICE_F_FRAGMENT;
        if (frag & 0x1fff)
            f->flags |= SLUICE_F_LATER_FRAG;
        return sluice_parse_l4(data, data_end, pkt, off + hlen);
    }
    if (proto == bpf_htons(ETH_P_IPV6)) {
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
        pkt->ip_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
        __u8 next = ip6->nexthdr;
        off += sizeof(*ip6);
#pragma unroll
        for (int i = 0; i < SLUICE_MAX_IPV6_EXT; i++) {
            if (f->flags & SLUICE_F_LATER_FRAG)
                break; /* after a non-first fragment header comes payload, not headers */
            if (sluice_ipv6_ext_generic(next)) {
                __u8 *ext = data + off;
                if ((void *)(ext + 2) > data_end)
                    return SLUICE_PARSE_MALFORMED;
                next = ext[0];
                off += (ext[1] + 1) * 8;
            } else if (next == IPPROTO_AH) {
                __u8 *ext = data + off; /* AH counts its length in 4-byte words, minus 2 */
                if ((void *)(ext + 2) > data_end)
                    return SLUICE_PARSE_MALFORMED;
                next = ext[0];
                off += (ext[1] + 2) * 4;
            } else if (next == IPPROTO_FRAGMENT) {
                __u8 *ext = data + off;
                if ((void *)(ext + 8) > data_end)
                    return SLUICE_PARSE_MALFORMED;
                next = ext[0];
                f->flags |= SLUICE_F_FRAGMENT;
                if (((ext[2] << 8) | ext[3]) & 0xfff8)
                    f->flags |= SLUICE_F_LATER_FRAG;
                off += 8;
            } else {
                break;
            }
        }
        if (!(f->flags & SLUICE_F_LATER_FRAG) &&
            (sluice_ipv6_ext_generic(next) || next == IPPROTO_AH || next == IPPROTO_FRAGMENT))
            return SLUICE_PARSE_MALFORMED; /* longer chain than we walk: treat as hostile */
        f->proto = next;
        if (off > 0xffff)
            return SLUICE_PARSE_MALFORMED;
        return sluice_parse_l4(data, data_end, pkt, off);
    }
    return SLUICE_PARSE_NOT_IP;
}

#endif
