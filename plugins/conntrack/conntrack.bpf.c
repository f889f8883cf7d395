/* conntrack: stateful connection tracking on TC, an observer (always SLUICE_NEXT).
 *
 * Tables: one TCP and one non-TCP ("any") LRU table per tenant, both address families in each
 * (addresses are 16 bytes, IPv4 v4-mapped, as sluice_parse gives them). The per-tenant tables
 * are inner maps of two pinned array-of-maps (ct_tcp, ct_any) indexed by a slot; ct_tenants maps
 * a tenant id to its slot. Tenant 0 (no tenant configured) is slot 0, whose tables are the
 * pinned templates, used by name on the common path (see struct ct_table).
 * User space creates and removes tenants' tables at run time. A tenant is taken from the
 * interface (ct_ifaces), or from the tunnel VNI when the interface says so, so two tenants with
 * the same addresses never share an entry.
 *
 * An entry is keyed by the tuple of the packet that created it (the "original" direction,
 * index 0); packets of the other direction find it through the reversed tuple (index 1).
 * lifetime is an absolute CLOCK_MONOTONIC second: the entry is expired once it is below "now"
 * and user-space GC removes it (the LRU evicts the oldest when a table is full).
 */
#include <sluice/sluice.h>

#ifndef CT_TCP_MAX
#define CT_TCP_MAX 524288
#endif
#ifndef CT_ANY_MAX
#define CT_ANY_MAX 262144
#endif
#ifndef CT_MAX_TENANTS
#define CT_MAX_TENANTS 1024
#endif

#define CT_F_TX_CLOSING 0x1 /* the original direction sent FIN or RST */
#define CT_F_RX_CLOSING 0x2 /* the reply direction sent FIN or RST */
#define CT_F_SEEN_NON_SYN 0x4
#define CT_F_RELATED 0x8 /* an ICMP error about this connection was seen */

#define CT_KEY_F_RELATED 0x2 /* key flag, as Cilium's TUPLE_F_RELATED (not used for lookups yet) */

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_ACK 0x10

enum ct_report {
    CT_REPORT_NEW = 1,
    CT_REPORT_FLAGS = 2,    /* new TCP flags in this direction */
    CT_REPORT_INTERVAL = 3, /* report_interval elapsed since this direction last reported */
    CT_REPORT_RELATED = 4,  /* an ICMP error about the connection */
    CT_REPORT_REPLY = 5,    /* the first packet of the reply direction */
};

enum ct_stat {
    CT_STAT_PACKETS,
    CT_STAT_CREATED_TCP,
    CT_STAT_CREATED_ANY,
    CT_STAT_MIDSTREAM,     /* TCP packet without an entry that is not a SYN: not tracked */
    CT_STAT_RELATED,
    CT_STAT_RELATED_ORPHAN, /* ICMP error about a connection we do not know */
    CT_STAT_MALFORMED,
    CT_STAT_NO_TABLE,      /* the packet's tenant has no table */
    CT_STAT_REPORTS,
    CT_STAT_REPORTS_LOST,  /* ring buffer full */
    CT_STAT_CREATE_FAILED,
    CT_STAT_ICMP_OTHER,    /* ICMP neither echo nor error (ND, router adverts...): not tracked */
    CT_STAT_REOPENED,      /* SYN on a closing entry */
    CT_STAT_FRAGMENTS,     /* non-first fragments: no ports, not tracked */
    CT_STAT_MAX,
};

struct ct_key {
    __u8 saddr[16];
    __u8 daddr[16];
    __u16 sport; /* host order; ICMP echo: the id in sport (request) or dport (reply) */
    __u16 dport;
    __u8 proto;
    __u8 flags;
    __u16 pad;
};

struct ct_entry {
    __u64 packets[2]; /* [0] original direction, [1] reply */
    __u64 bytes[2];
    __u64 created_ns; /* CLOCK_MONOTONIC */
    __u64 last_seen_ns;
    __u32 lifetime; /* absolute CLOCK_MONOTONIC seconds */
    __u32 related;  /* ICMP errors seen about this connection */
    __u32 last_report[2];
    __u16 flags; /* CT_F_* */
    __u8 tcp_flags_seen[2];
    __u32 tenant;
    __u32 ifindex; /* where the entry was created */
    __u32 pad;
};

struct ct_settings {
    __u32 tcp_established;
    __u32 tcp_syn;
    __u32 tcp_close;
    __u32 non_tcp;
    __u32 report_interval;
    __u32 iface_tenants; /* interfaces in ct_ifaces: 0 skips that lookup (everything is tenant 0) */
};

struct ct_iface {
    __u32 tenant;
    __u32 from_vni; /* take the tenant from the tunnel key's VNI when the packet has one */
};

struct ct_report_event {
    struct ct_key key;
    struct ct_entry entry;
    __u32 reason; /* enum ct_report */
    __u32 dir;
};

/* Inner-map templates: BCC needs them to build the outer maps, and tenants' tables are made
 * alike. They are tenant 0's tables too (user space puts them in slot 0), pinned so that a
 * restart reuses them instead of preallocating new ones. */
SLUICE_MAP("lru_hash", struct ct_key, struct ct_entry, ct_tcp_inner, CT_TCP_MAX);
SLUICE_MAP("lru_hash", struct ct_key, struct ct_entry, ct_any_inner, CT_ANY_MAX);
SLUICE_MAP("array_of_maps$ct_tcp_inner", u32, int, ct_tcp, CT_MAX_TENANTS);
SLUICE_MAP("array_of_maps$ct_any_inner", u32, int, ct_any, CT_MAX_TENANTS);
SLUICE_MAP("hash", u32, u32, ct_tenants, CT_MAX_TENANTS); /* tenant id -> slot (not tenant 0) */
SLUICE_MAP("hash", u32, struct ct_iface, ct_ifaces, 1024);
SLUICE_MAP("array", u32, struct ct_settings, ct_settings, 1);
SLUICE_MAP("percpu_array", u32, u64, ct_stats, CT_STAT_MAX);
SLUICE_RINGBUF(ct_reports, 64);

static __always_inline void ct_count(u32 what)
{
    u64 *v = ct_stats.lookup(&what);
    if (v)
        *v += 1; /* per-CPU slot */
}

static __always_inline u32 ct_tenant(struct __sk_buff *skb)
{
    u32 ifindex = skb->ifindex;
    struct ct_iface *cfg = ct_ifaces.lookup(&ifindex);
    if (!cfg)
        return 0;
    if (cfg->from_vni) {
        struct bpf_tunnel_key tk = {};
        if (bpf_skb_get_tunnel_key(skb, &tk, sizeof(tk), 0) == 0 ||
            bpf_skb_get_tunnel_key(skb, &tk, sizeof(tk), BPF_F_TUNINFO_IPV6) == 0)
            return tk.tunnel_id;
    }
    return cfg->tenant;
}

/* Where a packet's entries live. Tenant 0's tables are the inner-map templates themselves (user
 * space keeps them in slot 0), so they are used by name: the verifier then knows the map and
 * inlines the lookups, which saves ~15 ns per lookup over going through the outer map. */
struct ct_table {
    void *map;  /* another tenant's inner map */
    u8 tenant0; /* 1: tenant 0's table of this kind, used by name */
    u8 tcp;
};

static __always_inline int ct_table(u32 tenant, int tcp, struct ct_table *t)
{
    t->tcp = tcp;
    t->tenant0 = tenant == 0;
    t->map = NULL;
    if (t->tenant0)
        return 0;
    u32 *slot = ct_tenants.lookup(&tenant);
    if (!slot)
        return -1;
    t->map = tcp ? ct_tcp.lookup(slot) : ct_any.lookup(slot);
    return t->map ? 0 : -1;
}

static __always_inline struct ct_entry *ct_lookup(const struct ct_table *t, const struct ct_key *key)
{
    if (t->tenant0)
        return t->tcp ? ct_tcp_inner.lookup((void *)key) : ct_any_inner.lookup((void *)key);
    return bpf_map_lookup_elem(t->map, key);
}

static __always_inline int ct_create(const struct ct_table *t, const struct ct_key *key, struct ct_entry *e)
{
    if (t->tenant0)
        return t->tcp ? ct_tcp_inner.insert((void *)key, e) : ct_any_inner.insert((void *)key, e);
    return bpf_map_update_elem(t->map, key, e, BPF_NOEXIST);
}

static __always_inline void ct_reverse(struct ct_key *out, const struct ct_key *in)
{
    __builtin_memcpy(out->saddr, in->daddr, 16);
    __builtin_memcpy(out->daddr, in->saddr, 16);
    out->sport = in->dport;
    out->dport = in->sport;
    out->proto = in->proto;
    out->flags = in->flags;
    out->pad = 0;
}

/* The entry for key in either direction; *dir says which one matched. */
static __always_inline struct ct_entry *ct_find(const struct ct_table *t, const struct ct_key *key, u32 *dir)
{
    struct ct_entry *e = ct_lookup(t, key);
    if (e) {
        *dir = 0;
        return e;
    }
    struct ct_key rev;
    ct_reverse(&rev, key);
    *dir = 1;
    return ct_lookup(t, &rev);
}

static __always_inline void ct_report(const struct ct_key *key, const struct ct_entry *e, u32 reason, u32 dir)
{
    struct ct_report_event ev = {};
    __builtin_memcpy(&ev.key, key, sizeof(ev.key));
    __builtin_memcpy(&ev.entry, e, sizeof(ev.entry));
    ev.reason = reason;
    ev.dir = dir;
    if (ct_reports.ringbuf_output(&ev, sizeof(ev), 0) == 0)
        ct_count(CT_STAT_REPORTS);
    else
        ct_count(CT_STAT_REPORTS_LOST);
}

static __always_inline int ct_is_icmp_error(u8 proto, u8 type)
{
    if (proto == IPPROTO_ICMP)
        return type == 3 || type == 4 || type == 5 || type == 11 || type == 12;
    return type >= 1 && type <= 4; /* ICMPv6: unreachable, too big, time exceeded, parameter */
}

static __always_inline int ct_is_echo(u8 proto, u8 type, int *reply)
{
    *reply = proto == IPPROTO_ICMP ? type == 0 : type == 129;
    return proto == IPPROTO_ICMP ? (type == 8 || type == 0) : (type == 128 || type == 129);
}

/* Fill key from the packet an ICMP error quotes (starting 8 bytes into the ICMP header). */
static __always_inline int ct_quoted_key(struct __sk_buff *skb, const struct sluice_pkt *pkt, struct ct_key *key)
{
    u32 off = pkt->l4_off + 8;
    u8 l4[8] = {};
    if (pkt->flow.family == 4) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.ihl < 5)
            return -1;
        sluice_v4_mapped(key->saddr, ip.saddr);
        sluice_v4_mapped(key->daddr, ip.daddr);
        key->proto = ip.protocol;
        off += ip.ihl * 4;
    } else {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
            return -1;
        __builtin_memcpy(key->saddr, &ip6.saddr, 16);
        __builtin_memcpy(key->daddr, &ip6.daddr, 16);
        key->proto = ip6.nexthdr; /* extension headers in quoted packets are not walked */
        off += sizeof(ip6);
    }
    if (off > 0xffff || bpf_skb_load_bytes(skb, off, l4, sizeof(l4)) < 0)
        return -1;
    if (key->proto == IPPROTO_TCP || key->proto == IPPROTO_UDP) {
        key->sport = (l4[0] << 8) | l4[1];
        key->dport = (l4[2] << 8) | l4[3];
        return 0;
    }
    int reply;
    if ((key->proto == IPPROTO_ICMP || key->proto == IPPROTO_ICMPV6) && ct_is_echo(key->proto, l4[0], &reply)) {
        u16 id = (l4[4] << 8) | l4[5];
        key->sport = reply ? 0 : id;
        key->dport = reply ? id : 0;
    }
    return 0;
}

static __always_inline int ct_related(struct __sk_buff *skb, struct sluice_pkt *pkt, u32 tenant)
{
    struct ct_key key = {};
    if (ct_quoted_key(skb, pkt, &key) < 0) {
        ct_count(CT_STAT_MALFORMED);
        return sluice_verdict(skb, pkt, SLUICE_NEXT, "ct-related-malformed");
    }
    struct ct_table table;
    u32 dir = 0;
    struct ct_entry *e = ct_table(tenant, key.proto == IPPROTO_TCP, &table) == 0 ? ct_find(&table, &key, &dir) : NULL;
    if (!e) {
        ct_count(CT_STAT_RELATED_ORPHAN);
        return sluice_verdict(skb, pkt, SLUICE_NEXT, "ct-related-unknown");
    }
    __sync_fetch_and_add(&e->related, 1);
    e->flags |= CT_F_RELATED;
    ct_count(CT_STAT_RELATED);
    ct_report(&key, e, CT_REPORT_RELATED, dir ^ 1); /* the error travels against the quoted packet */
    return sluice_verdict_detail(skb, pkt, SLUICE_NEXT, "ct-related", tenant, dir ^ 1, 0, 0);
}

static __always_inline u32 ct_tcp_lifetime(const struct ct_entry *e, const struct ct_settings *s)
{
    if ((e->flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING)) == (CT_F_TX_CLOSING | CT_F_RX_CLOSING))
        return s->tcp_close;
    if ((e->tcp_flags_seen[0] & TCP_SYN) && (e->tcp_flags_seen[1] & TCP_SYN))
        return s->tcp_established;
    return s->tcp_syn;
}

/* Account one TCP packet in direction dir; returns the closing flags it set. */
static __always_inline void ct_tcp_update(struct ct_entry *e, u8 tcp, u32 dir)
{
    u16 side = dir ? CT_F_RX_CLOSING : CT_F_TX_CLOSING;
    if ((tcp & TCP_SYN) && !(tcp & TCP_ACK) && (e->flags & (CT_F_TX_CLOSING | CT_F_RX_CLOSING))) {
        /* a new connection reusing the tuple of a closing one: start over */
        e->flags &= ~(CT_F_TX_CLOSING | CT_F_RX_CLOSING | CT_F_SEEN_NON_SYN);
        e->tcp_flags_seen[0] = 0;
        e->tcp_flags_seen[1] = 0;
        ct_count(CT_STAT_REOPENED);
    }
    int handshake_done = (e->tcp_flags_seen[0] & TCP_SYN) && (e->tcp_flags_seen[1] & TCP_SYN);
    if (tcp & TCP_RST)
        e->flags |= handshake_done ? side : (CT_F_TX_CLOSING | CT_F_RX_CLOSING);
    else if (tcp & TCP_FIN)
        e->flags |= side;
    if (!(tcp & TCP_SYN))
        e->flags |= CT_F_SEEN_NON_SYN;
}

static __always_inline void ct_settings_or_default(struct ct_settings *out)
{
    u32 zero = 0;
    struct ct_settings *s = ct_settings.lookup(&zero);
    out->tcp_established = s && s->tcp_established ? s->tcp_established : 8000;
    out->tcp_syn = s && s->tcp_syn ? s->tcp_syn : 60;
    out->tcp_close = s && s->tcp_close ? s->tcp_close : 10;
    out->non_tcp = s && s->non_tcp ? s->non_tcp : 60;
    out->report_interval = s && s->report_interval ? s->report_interval : 5;
    out->iface_tenants = s ? s->iface_tenants : 0;
}

int ct_tc(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    int parsed = sluice_parse(skb, &pkt);
    if (parsed == SLUICE_PARSE_NOT_IP)
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "not-ip");
    ct_count(CT_STAT_PACKETS);
    if (parsed != SLUICE_PARSE_OK) {
        ct_count(CT_STAT_MALFORMED);
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "ct-malformed");
    }
    if (pkt.flow.flags & SLUICE_F_LATER_FRAG) {
        ct_count(CT_STAT_FRAGMENTS);
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "ct-fragment");
    }
    struct ct_settings s;
    ct_settings_or_default(&s);
    u32 tenant = s.iface_tenants ? ct_tenant(skb) : 0;
    u8 proto = pkt.flow.proto;
    struct ct_key key = {};
    __builtin_memcpy(key.saddr, pkt.flow.saddr, 16);
    __builtin_memcpy(key.daddr, pkt.flow.daddr, 16);
    key.proto = proto;
    if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
        u8 type = pkt.flow.sport;
        int reply;
        if (ct_is_icmp_error(proto, type))
            return ct_related(skb, &pkt, tenant);
        if (!ct_is_echo(proto, type, &reply)) {
            ct_count(CT_STAT_ICMP_OTHER);
            return sluice_verdict(skb, &pkt, SLUICE_NEXT, "ct-icmp-other");
        }
        u16 id = 0;
        if (bpf_skb_load_bytes(skb, pkt.l4_off + 4, &id, sizeof(id)) < 0) {
            ct_count(CT_STAT_MALFORMED);
            return sluice_verdict(skb, &pkt, SLUICE_NEXT, "ct-malformed");
        }
        id = bpf_ntohs(id);
        key.sport = reply ? 0 : id;
        key.dport = reply ? id : 0;
    } else if (proto == IPPROTO_TCP || proto == IPPROTO_UDP) {
        key.sport = pkt.flow.sport;
        key.dport = pkt.flow.dport;
    }

    int tcp = proto == IPPROTO_TCP;
    struct ct_table table;
    if (ct_table(tenant, tcp, &table) != 0) {
        ct_count(CT_STAT_NO_TABLE);
        return sluice_verdict_detail(skb, &pkt, SLUICE_NEXT, "ct-no-table", tenant, 0, 0, 0);
    }
    /* coarse (jiffies) clock: lifetimes are whole seconds, and it costs less than the precise one */
    u64 now_ns = bpf_ktime_get_coarse_ns();
    u32 now = now_ns / 1000000000ULL;
    u8 flags = pkt.flow.tcp_flags;
    u32 dir = 0;
    struct ct_entry *e = ct_find(&table, &key, &dir);
    if (!e) {
        if (tcp && !((flags & TCP_SYN) && !(flags & TCP_ACK))) {
            ct_count(CT_STAT_MIDSTREAM);
            return sluice_verdict(skb, &pkt, SLUICE_NEXT, "ct-midstream");
        }
        struct ct_entry fresh = {};
        fresh.packets[0] = 1;
        fresh.bytes[0] = skb->len;
        fresh.created_ns = now_ns;
        fresh.last_seen_ns = now_ns;
        fresh.lifetime = now + (tcp ? s.tcp_syn : s.non_tcp);
        fresh.last_report[0] = now;
        fresh.tcp_flags_seen[0] = flags;
        fresh.tenant = tenant;
        fresh.ifindex = skb->ifindex;
        if (ct_create(&table, &key, &fresh) != 0) {
            ct_count(CT_STAT_CREATE_FAILED); /* another CPU created it first: fine, or a full table */
            return sluice_verdict(skb, &pkt, SLUICE_NEXT, "ct-create-failed");
        }
        ct_count(tcp ? CT_STAT_CREATED_TCP : CT_STAT_CREATED_ANY);
        ct_report(&key, &fresh, CT_REPORT_NEW, 0);
        return sluice_verdict_detail(skb, &pkt, SLUICE_NEXT, "ct-new", tenant, 0, 0, 0);
    }

    u32 d = dir & 1;
    u32 reason = d && e->packets[1] == 0 ? CT_REPORT_REPLY : 0; /* racy by a packet at worst */
    __sync_fetch_and_add(&e->packets[d], 1);
    __sync_fetch_and_add(&e->bytes[d], skb->len);
    e->last_seen_ns = now_ns;
    if (tcp) {
        u8 before = e->tcp_flags_seen[d];
        ct_tcp_update(e, flags, d);
        e->tcp_flags_seen[d] |= flags;
        if (e->tcp_flags_seen[d] != before && !reason)
            reason = CT_REPORT_FLAGS;
        e->lifetime = now + ct_tcp_lifetime(e, &s);
    } else {
        e->lifetime = now + s.non_tcp;
    }
    if (!reason && now - e->last_report[d] >= s.report_interval)
        reason = CT_REPORT_INTERVAL;
    if (reason) {
        e->last_report[d] = now;
        /* report under the key the entry is stored at */
        struct ct_key stored;
        if (d)
            ct_reverse(&stored, &key);
        else
            __builtin_memcpy(&stored, &key, sizeof(stored));
        ct_report(&stored, e, reason, d);
    }
    if (d) /* reasons must be literals: the trace copies them by size */
        return sluice_verdict_detail(skb, &pkt, SLUICE_NEXT, "ct-reply", tenant, reason, 0, 0);
    return sluice_verdict_detail(skb, &pkt, SLUICE_NEXT, "ct-original", tenant, reason, 0, 0);
}
