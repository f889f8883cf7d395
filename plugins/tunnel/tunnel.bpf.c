/* tunnel: LPM-routed overlay encapsulation on TC egress (order 400).
 *
 * Per packet: longest-prefix match of the destination in one trie (IPv4 v4-mapped); a single
 * nexthop is used even when unhealthy (a lone peer must be able to recover); several: rendezvous
 * (highest-random-weight) hashing of the skb flow hash over the healthy ones, so a flow sticks
 * to its nexthop and only a withdrawn nexthop's flows move; none healthy: the kernel routes it.
 * The chosen nexthop's tunnel key (VNI, underlay, ttl 64) is set for the shared external-mode
 * device, the inner destination MAC becomes 02:<last 4 bytes of the underlay>:ff (the receiver's
 * device owns that MAC, so it takes the frame as PACKET_HOST), and the packet is redirected.
 *
 * Trace detail (sluice_verdict_detail): d0,d1 = the matched route's prefix (16 bytes, v4-mapped),
 * d2 = prefixlen | candidates << 8 | healthy mask << 12 | chosen << 16 (0xf: none)
 *      | why << 20 | protocol << 24 | vni << 32,
 * d3 = set-key result (s32, 1 = not run) | redirect result << 32 (s32, 0 = not run).
 */
#include <sluice/sluice.h>

#ifndef TUNNEL_MAX_ROUTES
#define TUNNEL_MAX_ROUTES 16384
#endif
#define TUNNEL_MAX_NEXTHOPS 4
#define TUNNEL_STATS_SLOTS 4096 /* distinct nexthops with packet/byte counters */
#define TUNNEL_NO_STATS 0xffff
#define TUNNEL_TTL 64

enum tunnel_proto { PROTO_GENEVE = 1, PROTO_VXLAN = 2, PROTO_IPIP = 3, PROTO_WIREGUARD = 4, PROTO_NONE = 5 };
enum tunnel_why { WHY_SINGLE = 1, WHY_HASH = 2, WHY_NONE_HEALTHY = 3 };
enum tunnel_counter {
    C_MISS,
    C_NO_HEALTHY,
    C_REDIRECT_ERR,
    C_SET_KEY_ERR,
    C_MALFORMED,
    C_ENCAP,
    C_NOT_IP,
    C_MAX,
};

struct tunnel_key {
    u32 prefixlen;
    u8 addr[16];
};

struct tunnel_nexthop {
    u8 remote[16]; /* underlay address, v4-mapped for IPv4 */
    u32 vni;
    u32 ifindex; /* device to redirect to */
    u8 healthy;
    u8 protocol;
    u16 stats; /* this nexthop's slot in tunnel_nh_stats (assigned by the agent), or TUNNEL_NO_STATS */
};

struct tunnel_route {
    u8 prefix[16]; /* the route itself, so a trace names the match and not the lookup key */
    u32 prefixlen;
    u32 count;
    struct tunnel_nexthop nh[TUNNEL_MAX_NEXTHOPS];
};

struct tunnel_nh_stats {
    u64 packets;
    u64 bytes;
};

SLUICE_MAP_FLAGS("lpm_trie", struct tunnel_key, struct tunnel_route, tunnel_routes, TUNNEL_MAX_ROUTES,
                 BPF_F_NO_PREALLOC);
SLUICE_MAP("percpu_array", u32, struct tunnel_nh_stats, tunnel_nh_stats, TUNNEL_STATS_SLOTS);
SLUICE_MAP("percpu_array", u32, u64, tunnel_counters, C_MAX);

static __always_inline void count(u32 which)
{
    u64 *c = tunnel_counters.lookup(&which);
    if (c)
        *c += 1; /* per-CPU: no atomics needed */
}

static __always_inline void count_nexthop(const struct tunnel_nexthop *hop, u32 len)
{
    u32 slot = hop->stats; /* an array slot, not a hash key: ~30 ns less per packet */
    struct tunnel_nh_stats *s = tunnel_nh_stats.lookup(&slot);
    if (s) {
        s->packets += 1;
        s->bytes += len;
    }
}

/* murmur3's finaliser: cheap, and every input bit moves every output bit. */
static __always_inline u32 mix32(u32 h)
{
    h ^= h >> 16;
    h *= 0x85ebca6b;
    h ^= h >> 13;
    h *= 0xc2b2ae35;
    h ^= h >> 16;
    return h;
}

/* A nexthop's identity for rendezvous hashing: independent of its slot, so reordering or removing
 * other nexthops never changes which flows it wins. Must match engine.py's nexthop_seed(). */
static __always_inline u32 nexthop_seed(const struct tunnel_nexthop *nh)
{
    const u32 *w = (const u32 *)nh->remote;
    return mix32(w[0] ^ mix32(w[1] ^ mix32(w[2] ^ mix32(w[3] ^ mix32(nh->vni)))));
}

static __always_inline u64 prefix_word(const u8 *p)
{
    u64 w;
    __builtin_memcpy(&w, p, 8);
    return w;
}

int tunnel_egress(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    int parsed = sluice_parse(skb, &pkt);
    if (parsed == SLUICE_PARSE_NOT_IP) {
        count(C_NOT_IP);
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "not-ip");
    }
    if (parsed != SLUICE_PARSE_OK) {
        count(C_MALFORMED);
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "malformed");
    }

    struct tunnel_key key = {.prefixlen = 128};
    __builtin_memcpy(key.addr, pkt.flow.daddr, 16);
    struct tunnel_route *r = tunnel_routes.lookup(&key);
    if (!r || r->count == 0) {
        count(C_MISS);
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "miss");
    }

    u32 n = r->count < TUNNEL_MAX_NEXTHOPS ? r->count : TUNNEL_MAX_NEXTHOPS;
    u32 chosen = 0xf, why = WHY_SINGLE, healthy = 0;
    if (n == 1) {
        chosen = 0;
        healthy = r->nh[0].healthy ? 1 : 0;
    } else {
        why = WHY_HASH;
        u32 hash = bpf_get_hash_recalc(skb), best = 0;
#pragma unroll
        for (u32 i = 0; i < TUNNEL_MAX_NEXTHOPS; i++) {
            if (i >= n || !r->nh[i].healthy)
                continue;
            healthy |= 1 << i;
            u32 weight = mix32(hash ^ nexthop_seed(&r->nh[i]));
            if (chosen == 0xf || weight > best) {
                best = weight;
                chosen = i;
            }
        }
    }
    u64 d0 = prefix_word(r->prefix), d1 = prefix_word(r->prefix + 8);
    u64 d2 = (r->prefixlen & 0xff) | n << 8 | healthy << 12 | chosen << 16;
    if (chosen == 0xf) {
        count(C_NO_HEALTHY);
        d2 |= WHY_NONE_HEALTHY << 20;
        return sluice_verdict_detail(skb, &pkt, SLUICE_NEXT, "no-healthy", d0, d1, d2, 1);
    }

    struct tunnel_nexthop hop;
    __builtin_memcpy(&hop, &r->nh[chosen & (TUNNEL_MAX_NEXTHOPS - 1)], sizeof(hop));
    d2 |= (u64)why << 20 | (u64)hop.protocol << 24 | (u64)hop.vni << 32;

    s32 set_key = 1;
    if (hop.protocol == PROTO_VXLAN || hop.protocol == PROTO_GENEVE || hop.protocol == PROTO_IPIP) {
        struct bpf_tunnel_key tk = {};
        u64 flags = 0;
        if (sluice_is_v4_mapped(hop.remote)) {
            tk.remote_ipv4 = (u32)hop.remote[12] << 24 | (u32)hop.remote[13] << 16 | (u32)hop.remote[14] << 8 |
                             hop.remote[15];
        } else {
            __builtin_memcpy(tk.remote_ipv6, hop.remote, 16); /* network order, as the kernel copies it */
            flags = BPF_F_TUNINFO_IPV6;
        }
        tk.tunnel_id = hop.vni;
        tk.tunnel_ttl = TUNNEL_TTL;
        set_key = bpf_skb_set_tunnel_key(skb, &tk, sizeof(tk), flags);
        if (set_key < 0) {
            count(C_SET_KEY_ERR);
            return sluice_verdict_detail(skb, &pkt, SLUICE_NEXT, "set-key-failed", d0, d1, d2, (u32)set_key);
        }
    }
    if (hop.protocol != PROTO_NONE && hop.protocol != PROTO_WIREGUARD) {
        /* Only Ethernet devices take an inner MAC; WireGuard and plain redirects are L3. */
        u8 mac[6] = {0x02, hop.remote[12], hop.remote[13], hop.remote[14], hop.remote[15], 0xff};
        void *data = (void *)(long)skb->data, *data_end = (void *)(long)skb->data_end;
        if (data + sizeof(mac) <= data_end) /* parsed above; a direct write is cheaper than a helper */
            __builtin_memcpy(data, mac, sizeof(mac));
    }
    int redirect = bpf_redirect(hop.ifindex, 0);
    u64 d3 = (u32)set_key | (u64)(u32)redirect << 32;
    if (redirect != TC_ACT_REDIRECT) {
        count(C_REDIRECT_ERR);
        return sluice_verdict_detail(skb, &pkt, redirect, "redirect-failed", d0, d1, d2, d3);
    }
    count(C_ENCAP);
    count_nexthop(&hop, skb->len);
    return sluice_verdict_detail(skb, &pkt, redirect, "encap", d0, d1, d2, d3);
}
