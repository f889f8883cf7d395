/* The firewall datapath: stateful egress policy for clients behind one interface.
 *
 * fw_ingress runs on TC ingress of the client-facing interface (packets from clients): a live
 * session passes; otherwise the policy of the generation named in fw_active decides, and an
 * allowed flow gets a session. fw_egress runs on TC egress of the same interface (packets toward
 * clients): only replies of a live session pass, anything unsolicited is dropped.
 *
 * Atomic policy swap: every policy map exists twice (_0 and _1). User space fills the inactive
 * generation completely, then flips the one u32 in fw_active; a packet reads fw_active once and
 * uses one generation for all its lookups, so it never sees half a policy.
 *
 * Allowed packets return SLUICE_NEXT (later programs in the chain, e.g. forwarding, still run).
 */
#include <sluice/sluice.h>

#ifndef FW_MAX_SESSIONS
#define FW_MAX_SESSIONS 16384
#endif
#ifndef FW_MAX_PREFIXES
#define FW_MAX_PREFIXES 16384 /* destination prefixes per generation */
#endif
#ifndef FW_MAX_SOURCES
#define FW_MAX_SOURCES 4096
#endif
#ifndef FW_MAX_DNS
#define FW_MAX_DNS 16384 /* learned (network, address) pairs per generation */
#endif
#ifndef FW_AUDIT_PAGES
#define FW_AUDIT_PAGES 64
#endif
#define FW_MAX_NETS 1024
#define FW_RULE_SLOTS 16
#define FW_DNS_SLOTS 4
#define FW_NSETTINGS 32
#define FW_NCOUNTERS 24

/* ---- settings (fw_settings index; names live in settings.py) ---- */
#define S_AUDIT_MODE 0
#define S_MONITOR 1
#define S_DROP_UNSOLICITED 2
#define S_DROP_MALFORMED 3
#define S_REQUIRE_SYN 4
#define S_DROP_UNMATCHED 5
#define S_TCP_EST_TIMEOUT 6
#define S_TCP_SYN_TIMEOUT 7
#define S_TCP_CLOSE_TIMEOUT 8
#define S_UDP_TIMEOUT 9
#define S_ICMP_TIMEOUT 10
#define S_OTHER_TIMEOUT 11
#define S_AUDIT_RATE 12
#define S_ILB_SNAT 13

/* ---- counters (fw_counters index) ---- */
#define C_ALLOWED_NEW 0
#define C_ALLOWED_ESTABLISHED 1
#define C_REPLIES 2
#define C_BLOCKED_POLICY 3
#define C_BLOCKED_UNSOLICITED 4
#define C_BLOCKED_MALFORMED 5
#define C_BLOCKED_NO_SYN 6
#define C_AUDIT_WOULD_BLOCK 7
#define C_BYPASS 8
#define C_SESSION_FULL 9
#define C_AUDIT_EVENTS 10
#define C_AUDIT_LOST 11
#define C_AUDIT_RATE_LIMITED 12
#define C_BLOCKED_UNMATCHED 13
#define C_NAT_EXHAUSTED 15
#define C_FRAGMENT_FOLLOWED 16 /* a non-first fragment passed: its first fragment did */
#define C_BLOCKED_FRAGMENT 17  /* a non-first fragment whose first fragment never passed */

/* ---- reasons (audit events, session rule provenance) ---- */
#define R_RULE 1
#define R_DNS 2
#define R_DEFAULT 3
#define R_UNSOLICITED 4
#define R_MALFORMED 5
#define R_NO_SYN 6
#define R_SESSION_FULL 7
#define R_UNMATCHED 8
#define R_FRAGMENT 9 /* a non-first fragment without an allowed first fragment */

#define ACT_ALLOW 0
#define ACT_DENY 1
#define ACT_BYPASS 2          /* a management destination (an order-0 slot) */
#define BYPASS_NET 0xffffffff /* the source trie's answer for management sources */

#define TCP_NONE 0
#define TCP_SYN_SENT 1
#define TCP_ESTABLISHED 2
#define TCP_CLOSING 3 /* FIN seen in one direction */
#define TCP_CLOSED 4  /* FIN both ways, or RST */

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

#define PROTO_ICMP_ANY 1 /* rules say "icmp" for ICMP and ICMPv6 alike */

struct fw_addr_key { /* LPM: sources and bypass */
    u32 prefixlen;
    u8 addr[16];
};

struct fw_dst_key { /* LPM: prefixlen = 32 + address prefix; the network id always matches fully */
    u32 prefixlen;
    u32 net_id;
    u8 addr[16];
};

struct fw_dns_key {
    u32 net_id;
    u8 addr[16];
};

struct fw_slot { /* one rule as it applies to a destination; slots are sorted by order */
    u32 order;   /* the rule's position in its network (1-based); lower wins */
    u16 port_lo; /* host order; 0..65535 for any */
    u16 port_hi;
    u8 proto; /* 0 any, 6 tcp, 17 udp, 1 icmp (and icmpv6) */
    u8 action;
    u8 pad[2];
};

struct fw_rules {
    u32 count;
    struct fw_slot slots[FW_RULE_SLOTS];
};

struct fw_dns_allow {
    u64 expires_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_ns) */
    u32 count;
    u32 pad;
    struct fw_slot slots[FW_DNS_SLOTS];
};

struct fw_net {
    u8 default_action;
    u8 pad[3];
    u32 flags;
};

struct fw_session_key { /* the originator's direction: client -> outside */
    u8 saddr[16];
    u8 daddr[16];
    u16 sport; /* ICMP echo: the identifier in sport (requests) */
    u16 dport;
    u8 proto;
    u8 pad[3];
};

struct fw_session {
    u64 first_seen_ns;
    u64 last_seen_ns;
    u64 packets[2]; /* 0: original direction, 1: reply */
    u64 bytes[2];
    u32 net_id;
    u32 rule_order; /* 0: decided by the default action or an implicit rule */
    u8 tcp_state;
    u8 tcp_flags[2]; /* union of TCP flags seen per direction */
    u8 flags;        /* FW_SF_* */
    u8 reason;       /* R_* that created it */
    u8 pad;
    u16 nat_port; /* ILB mode: the source port this flow is SNATed to (0: not translated) */
};
#define FW_SF_AUDIT 0x1    /* would have been blocked: passed by audit mode */
#define FW_SF_RESTORED 0x2 /* written by sluice_session_restore */

struct fw_audit_event {
    u64 ts_ns;
    struct sluice_flow flow;
    u32 ifindex;
    u32 net_id;
    u32 rule_order;
    u8 action;
    u8 reason;
    u8 audit_mode;
    u8 direction; /* 0: from clients, 1: toward clients */
};

struct fw_rate {
    u64 window_ns;
    u64 count;
};

SLUICE_MAP("array", u32, u32, fw_active, 1);
SLUICE_MAP("array", u32, u32, fw_settings, FW_NSETTINGS);
SLUICE_MAP("percpu_array", u32, u64, fw_counters, FW_NCOUNTERS);
SLUICE_MAP("percpu_array", u32, struct fw_rate, fw_audit_rate, 1);
SLUICE_MAP("hash", struct fw_session_key, struct fw_session, fw_sessions, FW_MAX_SESSIONS);
SLUICE_RINGBUF(fw_audit, FW_AUDIT_PAGES);
/* Session keys a successor must know at once (replication): a session's start and its TCP
 * handshake's end. The GC reports whatever was lost here (ring full) a gc_interval later. */
SLUICE_RINGBUF(fw_session_events, 16);

SLUICE_MAP_FLAGS("lpm_trie", struct fw_addr_key, u32, fw_src_0, FW_MAX_SOURCES, BPF_F_NO_PREALLOC);
SLUICE_MAP_FLAGS("lpm_trie", struct fw_addr_key, u32, fw_src_1, FW_MAX_SOURCES, BPF_F_NO_PREALLOC);
SLUICE_MAP_FLAGS("lpm_trie", struct fw_addr_key, u32, fw_bypass_0, 256, BPF_F_NO_PREALLOC);
SLUICE_MAP_FLAGS("lpm_trie", struct fw_addr_key, u32, fw_bypass_1, 256, BPF_F_NO_PREALLOC);
SLUICE_MAP_FLAGS("lpm_trie", struct fw_dst_key, struct fw_rules, fw_dst_0, FW_MAX_PREFIXES, BPF_F_NO_PREALLOC);
SLUICE_MAP_FLAGS("lpm_trie", struct fw_dst_key, struct fw_rules, fw_dst_1, FW_MAX_PREFIXES, BPF_F_NO_PREALLOC);
SLUICE_MAP_FLAGS("hash", struct fw_dns_key, struct fw_dns_allow, fw_dns_0, FW_MAX_DNS, BPF_F_NO_PREALLOC);
SLUICE_MAP_FLAGS("hash", struct fw_dns_key, struct fw_dns_allow, fw_dns_1, FW_MAX_DNS, BPF_F_NO_PREALLOC);
SLUICE_MAP("array", u32, struct fw_net, fw_nets_0, FW_MAX_NETS);
SLUICE_MAP("array", u32, struct fw_net, fw_nets_1, FW_MAX_NETS);

/* ---- small helpers ---- */

static __always_inline u32 fw_setting(u32 idx)
{
    u32 *v = fw_settings.lookup(&idx);
    return v ? *v : 0;
}

static __always_inline void fw_count(u32 idx)
{
    u64 *v = fw_counters.lookup(&idx);
    if (v)
        *v += 1; /* per-CPU slot */
}

static __always_inline u32 fw_generation(void)
{
    u32 zero = 0;
    u32 *g = fw_active.lookup(&zero);
    return g && *g ? 1 : 0;
}

static __always_inline u32 *fw_src_lookup(u32 gen, struct fw_addr_key *k)
{
    return gen ? fw_src_1.lookup(k) : fw_src_0.lookup(k);
}

static __always_inline u32 *fw_bypass_lookup(u32 gen, struct fw_addr_key *k)
{
    return gen ? fw_bypass_1.lookup(k) : fw_bypass_0.lookup(k);
}

static __always_inline struct fw_rules *fw_dst_lookup(u32 gen, struct fw_dst_key *k)
{
    return gen ? fw_dst_1.lookup(k) : fw_dst_0.lookup(k);
}

static __always_inline struct fw_dns_allow *fw_dns_lookup(u32 gen, struct fw_dns_key *k)
{
    return gen ? fw_dns_1.lookup(k) : fw_dns_0.lookup(k);
}

static __always_inline struct fw_net *fw_net_lookup(u32 gen, u32 *id)
{
    return gen ? fw_nets_1.lookup(id) : fw_nets_0.lookup(id);
}

static __always_inline int fw_is_bypassed(u32 gen, const u8 addr[16])
{
    struct fw_addr_key k = {.prefixlen = 128};
    __builtin_memcpy(k.addr, addr, 16);
    return fw_bypass_lookup(gen, &k) != NULL;
}

static __always_inline int fw_is_client(u32 gen, const u8 addr[16])
{
    struct fw_addr_key k = {.prefixlen = 128};
    __builtin_memcpy(k.addr, addr, 16);
    return fw_src_lookup(gen, &k) != NULL;
}

/* ICMPv6 neighbour discovery and MLD: the link needs them whatever the policy says. Only as the
 * RFCs send them, which never crosses a router: ND with hop limit 255 (RFC 4861), MLD with hop
 * limit 1 (RFC 2710, 3810). Anything else of these types from a denied client is policy's. */
static __always_inline int fw_is_link_control(const struct sluice_pkt *pkt)
{
    if (pkt->flow.proto != IPPROTO_ICMPV6)
        return 0;
    u16 t = pkt->flow.sport;
    if (t >= 133 && t <= 137)
        return pkt->ttl == 255;
    return (t >= 130 && t <= 132 || t == 143) && pkt->ttl == 1;
}

/* ICMP echo: key the session by identifier so that the reply (another type) finds it. */
static __always_inline int fw_echo_id(struct __sk_buff *skb, const struct sluice_pkt *pkt, u16 *id, int *request)
{
    u8 p = pkt->flow.proto;
    u16 t = pkt->flow.sport;
    if (p == IPPROTO_ICMP && (t == 8 || t == 0))
        *request = t == 8;
    else if (p == IPPROTO_ICMPV6 && (t == 128 || t == 129))
        *request = t == 128;
    else
        return 0;
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    u32 off = pkt->l4_off;
    if (off > 1024)
        return 0;
    u8 *icmp = data + off;
    if ((void *)(icmp + 8) > data_end)
        return 0;
    *id = (icmp[4] << 8) | icmp[5];
    return 1;
}

/* The session key of this packet as seen on the wire (not yet oriented). */
static __always_inline void fw_wire_key(struct __sk_buff *skb, const struct sluice_pkt *pkt, struct fw_session_key *k)
{
    __builtin_memset(k, 0, sizeof(*k));
    __builtin_memcpy(k->saddr, pkt->flow.saddr, 16);
    __builtin_memcpy(k->daddr, pkt->flow.daddr, 16);
    k->proto = pkt->flow.proto;
    k->sport = pkt->flow.sport;
    k->dport = pkt->flow.dport;
    u16 id = 0;
    int request = 0;
    if (fw_echo_id(skb, pkt, &id, &request)) {
        k->sport = request ? id : 0;
        k->dport = request ? 0 : id;
    }
}

static __always_inline void fw_reverse(const struct fw_session_key *k, struct fw_session_key *r)
{
    __builtin_memset(r, 0, sizeof(*r));
    __builtin_memcpy(r->saddr, k->daddr, 16);
    __builtin_memcpy(r->daddr, k->saddr, 16);
    r->sport = k->dport;
    r->dport = k->sport;
    r->proto = k->proto;
}

static __always_inline void fw_flip(struct fw_session_key *k)
{
    u8 a[16];
    __builtin_memcpy(a, k->saddr, 16);
    __builtin_memcpy(k->saddr, k->daddr, 16);
    __builtin_memcpy(k->daddr, a, 16);
    u16 p = k->sport;
    k->sport = k->dport;
    k->dport = p;
}

static __always_inline u64 fw_timeout_ns(const struct fw_session *s, u8 proto)
{
    u32 idx = S_OTHER_TIMEOUT;
    if (proto == IPPROTO_TCP) {
        if (s->tcp_state == TCP_SYN_SENT)
            idx = S_TCP_SYN_TIMEOUT;
        else if (s->tcp_state == TCP_ESTABLISHED)
            idx = S_TCP_EST_TIMEOUT;
        else
            idx = S_TCP_CLOSE_TIMEOUT;
    } else if (proto == IPPROTO_UDP) {
        idx = S_UDP_TIMEOUT;
    } else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
        idx = S_ICMP_TIMEOUT;
    }
    return (u64)fw_setting(idx) * 1000000000ULL;
}

static __always_inline int fw_session_live(const struct fw_session *s, u8 proto, u64 now)
{
    s64 idle = (s64)(now - s->last_seen_ns); /* negative when user space stamped it a moment ahead */
    return idle <= 0 || (u64)idle <= fw_timeout_ns(s, proto);
}

static __always_inline void fw_tcp_update(struct fw_session *s, u8 flags, int dir)
{
    if (flags & TH_RST) {
        s->tcp_state = TCP_CLOSED;
        return;
    }
    if (dir == 1 && (flags & TH_SYN) && (flags & TH_ACK) && s->tcp_state == TCP_SYN_SENT)
        s->tcp_state = TCP_ESTABLISHED;
    if (flags & TH_FIN) {
        u8 other = s->tcp_flags[dir ^ 1];
        s->tcp_state = (other & TH_FIN) ? TCP_CLOSED : TCP_CLOSING;
    }
}

/* Account one packet of a live session in direction dir (0 original, 1 reply). */
static __always_inline void fw_session_touch(struct fw_session *s, struct __sk_buff *skb,
                                             const struct sluice_pkt *pkt, int dir, u64 now)
{
    __sync_fetch_and_add(&s->packets[dir & 1], 1);
    __sync_fetch_and_add(&s->bytes[dir & 1], skb->len);
    s->last_seen_ns = now;
    if (pkt->flow.proto == IPPROTO_TCP) {
        fw_tcp_update(s, pkt->flow.tcp_flags, dir);
        s->tcp_flags[dir & 1] |= pkt->flow.tcp_flags;
    }
}

static __always_inline void fw_report(struct __sk_buff *skb, const struct sluice_pkt *pkt, u32 net_id,
                                     u32 order, u8 action, u8 reason, u8 direction)
{
    u32 zero = 0;
    u64 now = bpf_ktime_get_ns();
    struct fw_rate *rate = fw_audit_rate.lookup(&zero);
    if (!rate)
        return;
    /* Per-CPU fixed one-second windows: a flood costs at most audit-rate events per CPU per second. */
    if (now - rate->window_ns > 1000000000ULL) {
        rate->window_ns = now;
        rate->count = 0;
    }
    if (rate->count >= fw_setting(S_AUDIT_RATE)) {
        fw_count(C_AUDIT_RATE_LIMITED);
        return;
    }
    rate->count += 1;
    struct fw_audit_event *ev = fw_audit.ringbuf_reserve(sizeof(struct fw_audit_event));
    if (!ev) {
        fw_count(C_AUDIT_LOST);
        return;
    }
    ev->ts_ns = now;
    __builtin_memcpy(&ev->flow, &pkt->flow, sizeof(ev->flow));
    ev->ifindex = skb->ifindex;
    ev->net_id = net_id;
    ev->rule_order = order;
    ev->action = action;
    ev->reason = reason;
    ev->audit_mode = fw_setting(S_AUDIT_MODE) ? 1 : 0;
    ev->direction = direction;
    fw_audit.ringbuf_submit(ev, 0);
    fw_count(C_AUDIT_EVENTS);
}

/* First slot (lowest order) that matches proto and port; slots are sorted by order. */
static __always_inline int fw_match_slots(const struct fw_slot *slots, u32 count, u32 max, u8 proto,
                                          u16 dport, u32 *order, u8 *action)
{
#pragma clang loop unroll(disable) /* the verifier walks bounded loops; 4096 insns is the cap here */
    for (u32 i = 0; i < FW_RULE_SLOTS; i++) {
        if (i >= count || i >= max)
            break;
        const struct fw_slot *s = &slots[i];
        if (s->proto && s->proto != proto)
            continue;
        if (proto != PROTO_ICMP_ANY && (dport < s->port_lo || dport > s->port_hi))
            continue;
        if (s->order < *order) {
            *order = s->order;
            *action = s->action;
        }
        return 1;
    }
    return 0;
}

struct fw_decision {
    u32 net_id;
    u32 order;
    u8 action;
    u8 reason;
};

static __always_inline void fw_decide(u32 gen, const struct sluice_pkt *pkt, struct fw_decision *d, u64 now)
{
    struct fw_addr_key sk = {.prefixlen = 128};
    __builtin_memcpy(sk.addr, pkt->flow.saddr, 16);
    u32 *net = fw_src_lookup(gen, &sk);
    u32 net_id = net ? *net : 0; /* 0: a source in no network (its trie holds management only) */
    d->net_id = net_id;
    d->order = 0;
    if (net_id == BYPASS_NET) {
        d->action = ACT_BYPASS;
        d->reason = R_RULE;
        return;
    }
    u8 proto = pkt->flow.proto == IPPROTO_ICMPV6 ? PROTO_ICMP_ANY : pkt->flow.proto;
    u16 dport = pkt->flow.dport; /* later fragments never get here: they follow their first */
    u32 order = 0xffffffff;
    u8 action = ACT_DENY;

    struct fw_dst_key dk = {.prefixlen = 32 + 128, .net_id = net_id};
    __builtin_memcpy(dk.addr, pkt->flow.daddr, 16);
    struct fw_rules *rules = fw_dst_lookup(gen, &dk);
    if (rules)
        fw_match_slots(rules->slots, rules->count, FW_RULE_SLOTS, proto, dport, &order, &action);
    if (!net_id) {
        d->reason = R_UNMATCHED;
        if (order != 0xffffffff && action == ACT_BYPASS)
            d->action = ACT_BYPASS;
        else
            d->action = fw_setting(S_DROP_UNMATCHED) ? ACT_DENY : ACT_ALLOW;
        return;
    }
    u32 rule_order = order;

    struct fw_dns_key nk = {.net_id = net_id};
    __builtin_memcpy(nk.addr, pkt->flow.daddr, 16);
    struct fw_dns_allow *learned = fw_dns_lookup(gen, &nk);
    if (learned && now < learned->expires_ns)
        fw_match_slots(learned->slots, learned->count, FW_DNS_SLOTS, proto, dport, &order, &action);

    if (order != 0xffffffff) {
        d->order = order;
        d->action = action;
        d->reason = order == rule_order ? R_RULE : R_DNS;
        return;
    }
    struct fw_net *cfg = fw_net_lookup(gen, &net_id);
    d->action = cfg ? cfg->default_action : ACT_DENY;
    d->reason = R_DEFAULT;
}

static __always_inline int fw_syn_only(const struct sluice_pkt *pkt)
{
    return pkt->flow.proto == IPPROTO_TCP && (pkt->flow.tcp_flags & (TH_SYN | TH_ACK)) == TH_SYN;
}

/* A TCP session starts with a SYN (require-syn): an allowed mid-stream packet is denied. */
static __always_inline void fw_require_syn(const struct sluice_pkt *pkt, struct fw_decision *d)
{
    if (d->action == ACT_ALLOW && pkt->flow.proto == IPPROTO_TCP && !fw_syn_only(pkt) && fw_setting(S_REQUIRE_SYN)) {
        d->action = ACT_DENY;
        d->reason = R_NO_SYN;
    }
}

/* A packet we cannot parse: fail closed unless drop-malformed is off. */
static __always_inline int fw_malformed(struct __sk_buff *skb, struct sluice_pkt *pkt, u8 direction)
{
    if (!fw_setting(S_DROP_MALFORMED))
        return sluice_verdict(skb, pkt, SLUICE_NEXT, "malformed-passed");
    fw_count(C_BLOCKED_MALFORMED);
    fw_report(skb, pkt, 0, 0, ACT_DENY, R_MALFORMED, direction);
    if (fw_setting(S_AUDIT_MODE))
        return sluice_verdict(skb, pkt, SLUICE_NEXT, "audit-malformed");
    return sluice_verdict(skb, pkt, SLUICE_DROP, "malformed");
}

/* ---- fragments ----
 *
 * A non-first fragment carries no L4 header: its ports are unknown and its next-header is whatever
 * the sender wrote, so it is never judged by itself. It follows the verdict of its first fragment:
 * a first fragment that passes (and, through the shared parser, it carries its whole L4 header or
 * it is MALFORMED) records (addresses, protocol, fragment id) here; a later fragment passes only
 * when its datagram has a record. The kernel reassembles at the receiver, so what arrives there is
 * a datagram whose ports this program saw and allowed. Overlaps cannot change them: a later
 * fragment starts at offset >= 8, past any port field.
 */
#define FW_FRAG_TIMEOUT_NS (60ULL * 1000000000ULL) /* IPv6's reassembly timeout; IPv4 uses 30 s */
#ifndef FW_MAX_FRAGS
#define FW_MAX_FRAGS 8192
#endif

struct fw_frag_key {
    u8 saddr[16];
    u8 daddr[16];
    u32 id; /* IPv4 identification or the IPv6 fragment header's identification */
    u8 proto;
    u8 pad[3];
};

/* LRU: a flood of first fragments evicts old records instead of failing to record new ones. */
SLUICE_MAP("lru_hash", struct fw_frag_key, u64, fw_frags, FW_MAX_FRAGS);

static __always_inline void fw_frag_key_of(const struct sluice_pkt *pkt, struct fw_frag_key *k)
{
    __builtin_memset(k, 0, sizeof(*k));
    __builtin_memcpy(k->saddr, pkt->flow.saddr, 16);
    __builtin_memcpy(k->daddr, pkt->flow.daddr, 16);
    k->id = pkt->frag_id;
    k->proto = pkt->flow.proto;
}

/* Called on every packet that passes: records a first fragment (the only fragment with ports). */
static __always_inline void fw_frag_passed(const struct sluice_pkt *pkt)
{
    if ((pkt->flow.flags & (SLUICE_F_FRAGMENT | SLUICE_F_LATER_FRAG)) != SLUICE_F_FRAGMENT)
        return;
    struct fw_frag_key k;
    fw_frag_key_of(pkt, &k);
    u64 now = bpf_ktime_get_ns();
    fw_frags.update(&k, &now);
}

/* A non-first fragment: does its datagram's first fragment pass (recently)? */
static __always_inline int fw_frag_follows(const struct sluice_pkt *pkt)
{
    struct fw_frag_key k;
    fw_frag_key_of(pkt, &k);
    u64 *seen = fw_frags.lookup(&k);
    if (!seen)
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (now - *seen > FW_FRAG_TIMEOUT_NS)
        return 0;
    *seen = now; /* the reassembly timer of the receiver restarts with each fragment, too */
    return 1;
}

/* A pass that may be a first fragment: every SLUICE_NEXT of fw_ingress/fw_egress goes through it. */
#define fw_pass(skb, pkt, reason) ({ fw_frag_passed(pkt); sluice_verdict(skb, pkt, SLUICE_NEXT, reason); })
#define fw_pass_detail(skb, pkt, reason, d0, d1, d2, d3)                                                   \
    ({                                                                                                     \
        fw_frag_passed(pkt);                                                                               \
        sluice_verdict_detail(skb, pkt, SLUICE_NEXT, reason, d0, d1, d2, d3);                              \
    })

/* A non-first fragment whose first fragment never passed: dropped (audit mode passes and reports). */
static __always_inline int fw_orphan_fragment(struct __sk_buff *skb, struct sluice_pkt *pkt, u8 direction)
{
    fw_report(skb, pkt, 0, 0, ACT_DENY, R_FRAGMENT, direction);
    if (fw_setting(S_AUDIT_MODE)) {
        fw_count(C_AUDIT_WOULD_BLOCK);
        return sluice_verdict(skb, pkt, SLUICE_NEXT, "audit-fragment");
    }
    fw_count(C_BLOCKED_FRAGMENT);
    return sluice_verdict(skb, pkt, SLUICE_DROP, "orphan-fragment");
}

/* An IPv6 header naming a v4-mapped address (::ffff:a.b.c.d): the tries key IPv4 that way, so it
 * would be judged by IPv4 rules. No such packet is legitimate on the wire (RFC 4291 2.5.5.2). */
static __always_inline int fw_mixed_family(const struct sluice_pkt *pkt)
{
    return pkt->flow.family == 6 && (sluice_is_v4_mapped(pkt->flow.saddr) || sluice_is_v4_mapped(pkt->flow.daddr));
}

static __always_inline void fw_session_event(const struct fw_session_key *k)
{
    struct fw_session_key *ev = fw_session_events.ringbuf_reserve(sizeof(struct fw_session_key));
    if (!ev)
        return;
    __builtin_memcpy(ev, k, sizeof(*ev));
    fw_session_events.ringbuf_submit(ev, 0);
}

/* The new session is built in a per-CPU scratch slot: fw_geneve's stack is close to 512 bytes. */
BPF_PERCPU_ARRAY(fw_session_scratch, struct fw_session, 1);
BPF_PERCPU_ARRAY(fw_inner_scratch, struct sluice_pkt, 1); /* fw_geneve's inner packet */

static __always_inline int fw_new_session(struct fw_session_key *k, struct __sk_buff *skb,
                                          const struct sluice_pkt *pkt, struct fw_decision *d, u8 flags, u64 now)
{
    u32 zero = 0;
    struct fw_session *s = fw_session_scratch.lookup(&zero);
    if (!s)
        return -1;
    __builtin_memset(s, 0, sizeof(*s));
    s->first_seen_ns = now;
    s->last_seen_ns = now;
    s->packets[0] = 1;
    s->bytes[0] = skb->len;
    s->net_id = d->net_id;
    s->rule_order = d->order;
    s->reason = d->reason;
    s->flags = flags;
    if (pkt->flow.proto == IPPROTO_TCP) {
        s->tcp_flags[0] = pkt->flow.tcp_flags;
        s->tcp_state = (pkt->flow.tcp_flags & TH_RST) ? TCP_CLOSED : TCP_SYN_SENT;
    }
    return fw_sessions.update(k, s);
}

int fw_ingress(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    int parsed = sluice_parse(skb, &pkt);
    if (parsed == SLUICE_PARSE_NOT_IP)
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "not-ip");
    if (parsed != SLUICE_PARSE_OK)
        return fw_malformed(skb, &pkt, 0);
    if (fw_mixed_family(&pkt))
        return fw_malformed(skb, &pkt, 0);
    if (pkt.flow.flags & SLUICE_F_LATER_FRAG) {
        if (fw_frag_follows(&pkt)) {
            fw_count(C_FRAGMENT_FOLLOWED);
            return sluice_verdict(skb, &pkt, SLUICE_NEXT, "fragment");
        }
        return fw_orphan_fragment(skb, &pkt, 0);
    }
    if (fw_is_link_control(&pkt))
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "link-control");
    /* The session first: an established packet costs one hash lookup. */
    u64 now = bpf_ktime_get_ns();
    struct fw_session_key k;
    fw_wire_key(skb, &pkt, &k);
    int syn_only = fw_syn_only(&pkt);
    struct fw_session *s = fw_sessions.lookup(&k);
    if (s && fw_session_live(s, pkt.flow.proto, now) && !(syn_only && s->tcp_state == TCP_CLOSED)) {
        fw_session_touch(s, skb, &pkt, 0, now);
        fw_count(C_ALLOWED_ESTABLISHED);
        return fw_pass(skb, &pkt, "established");
    }

    struct fw_decision d = {};
    fw_decide(fw_generation(), &pkt, &d, now);
    if (d.action == ACT_BYPASS) {
        fw_count(C_BYPASS);
        return fw_pass(skb, &pkt, "management");
    }
    fw_require_syn(&pkt, &d);
    int monitor = fw_setting(S_MONITOR);
    if (d.action == ACT_ALLOW) {
        if (fw_new_session(&k, skb, &pkt, &d, 0, now) != 0) {
            fw_count(C_SESSION_FULL);
            fw_report(skb, &pkt, d.net_id, d.order, ACT_DENY, R_SESSION_FULL, 0);
            return sluice_verdict(skb, &pkt, SLUICE_DROP, "session-table-full");
        }
        fw_count(C_ALLOWED_NEW);
        fw_session_event(&k);
        if (monitor)
            fw_report(skb, &pkt, d.net_id, d.order, ACT_ALLOW, d.reason, 0);
        return fw_pass_detail(skb, &pkt, "allow", d.net_id, d.order, d.reason, 0);
    }

    fw_report(skb, &pkt, d.net_id, d.order, ACT_DENY, d.reason, 0);
    if (fw_setting(S_AUDIT_MODE)) {
        fw_count(C_AUDIT_WOULD_BLOCK);
        fw_new_session(&k, skb, &pkt, &d, FW_SF_AUDIT, now); /* so its replies pass too */
        return fw_pass_detail(skb, &pkt, "audit-would-block", d.net_id, d.order, d.reason, 0);
    }
    if (d.reason == R_NO_SYN)
        fw_count(C_BLOCKED_NO_SYN);
    else if (d.reason == R_UNMATCHED)
        fw_count(C_BLOCKED_UNMATCHED);
    else
        fw_count(C_BLOCKED_POLICY);
    return sluice_verdict_detail(skb, &pkt, SLUICE_DROP, "deny", d.net_id, d.order, d.reason, 0);
}

/* An ICMP error toward a client (unreachable, packet too big, time exceeded, parameter problem)
 * quotes the client's packet: the session of that packet is the one it belongs to. Read with
 * bpf_skb_load_bytes: the quote is untrusted data at a variable offset. Returns 1 with k set. */
static __always_inline int fw_related_key(struct __sk_buff *skb, const struct sluice_pkt *pkt,
                                          struct fw_session_key *k)
{
    u8 t = pkt->flow.sport;
    if (pkt->flow.proto == IPPROTO_ICMP) {
        if (t != 3 && t != 11 && t != 12)
            return 0;
    } else if (pkt->flow.proto == IPPROTO_ICMPV6) {
        if (t < 1 || t > 4)
            return 0;
    } else {
        return 0;
    }
    u32 off = pkt->l4_off + 8; /* the quoted IP header */
    if (off > 1024)
        return 0;
    __builtin_memset(k, 0, sizeof(*k));
    u16 ports[2];
    if (pkt->flow.family == 4) {
        struct iphdr ip;
        if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.version != 4 || ip.ihl < 5)
            return 0;
        sluice_v4_mapped(k->saddr, ip.saddr);
        sluice_v4_mapped(k->daddr, ip.daddr);
        k->proto = ip.protocol;
        off += ip.ihl * 4;
    } else {
        struct ipv6hdr ip6;
        if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0 || ip6.version != 6)
            return 0;
        __builtin_memcpy(k->saddr, &ip6.saddr, 16);
        __builtin_memcpy(k->daddr, &ip6.daddr, 16);
        k->proto = ip6.nexthdr;
        off += sizeof(ip6);
    }
    if (k->proto != IPPROTO_TCP && k->proto != IPPROTO_UDP)
        return 0;
    if (bpf_skb_load_bytes(skb, off & 0x7ff, ports, sizeof(ports)) < 0)
        return 0;
    k->sport = bpf_ntohs(ports[0]);
    k->dport = bpf_ntohs(ports[1]);
    return 1;
}

int fw_egress(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    int parsed = sluice_parse(skb, &pkt);
    if (parsed == SLUICE_PARSE_NOT_IP)
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "not-ip");
    if (parsed != SLUICE_PARSE_OK)
        return fw_malformed(skb, &pkt, 1);
    if (fw_mixed_family(&pkt))
        return fw_malformed(skb, &pkt, 1);
    if (pkt.flow.flags & SLUICE_F_LATER_FRAG) {
        if (fw_frag_follows(&pkt)) {
            fw_count(C_FRAGMENT_FOLLOWED);
            return sluice_verdict(skb, &pkt, SLUICE_NEXT, "fragment");
        }
        if (!fw_setting(S_DROP_UNSOLICITED))
            return sluice_verdict(skb, &pkt, SLUICE_NEXT, "unsolicited-passed");
        return fw_orphan_fragment(skb, &pkt, 1);
    }
    if (fw_is_link_control(&pkt))
        return sluice_verdict(skb, &pkt, SLUICE_NEXT, "link-control");
    u64 now = bpf_ktime_get_ns();
    struct fw_session_key wire, k;
    fw_wire_key(skb, &pkt, &wire);
    fw_reverse(&wire, &k);
    struct fw_session *s = fw_sessions.lookup(&k);
    if (s && fw_session_live(s, pkt.flow.proto, now)) {
        u8 was = s->tcp_state;
        fw_session_touch(s, skb, &pkt, 1, now);
        if (was != s->tcp_state && s->tcp_state == TCP_ESTABLISHED)
            fw_session_event(&k);
        fw_count(C_REPLIES);
        return fw_pass(skb, &pkt, "reply");
    }
    if (fw_related_key(skb, &pkt, &k)) {
        s = fw_sessions.lookup(&k);
        if (s && fw_session_live(s, k.proto, now)) {
            fw_count(C_REPLIES);
            return fw_pass(skb, &pkt, "related");
        }
    }
    u32 gen = fw_generation();
    if (fw_is_bypassed(gen, pkt.flow.saddr) || fw_is_bypassed(gen, pkt.flow.daddr)) {
        fw_count(C_BYPASS);
        return fw_pass(skb, &pkt, "management");
    }
    if (!fw_setting(S_DROP_UNSOLICITED))
        return fw_pass(skb, &pkt, "unsolicited-passed");
    fw_report(skb, &pkt, 0, 0, ACT_DENY, R_UNSOLICITED, 1);
    if (fw_setting(S_AUDIT_MODE)) {
        fw_count(C_AUDIT_WOULD_BLOCK);
        return fw_pass(skb, &pkt, "audit-unsolicited");
    }
    fw_count(C_BLOCKED_UNSOLICITED);
    return sluice_verdict(skb, &pkt, SLUICE_DROP, "unsolicited");
}

/* ---- GENEVE appliance mode (Gateway Load Balancer style) ----
 *
 * fw_geneve runs on TC ingress of the interface facing the load balancer. A UDP datagram to
 * port 6081 carrying GENEVE (protocol IPv4 or IPv6, no inner Ethernet) is inspected: the inner
 * packet goes through the same sessions and policy as fw_ingress. An allowed packet is returned
 * to the load balancer on the interface it came from with the outer MACs and IPs swapped and
 * everything else (UDP ports, GENEVE header, options, inner packet) kept byte for byte: swapping
 * addresses changes no checksum. Per-flow tunnel metadata is kept in fw_geneve_flows.
 */
#ifndef FW_GENEVE_PORT
#define FW_GENEVE_PORT 6081
#endif
#define C_REDIRECTED 14
#define TUNNEL_GENEVE 1

struct fw_tunnel {
    u8 type; /* TUNNEL_GENEVE */
    u8 pad[3];
    u32 vni;
    u8 cookie[8]; /* first 8 bytes of the GENEVE options (zero when shorter) */
    u8 outer_src[16];
    u8 outer_dst[16];
    u8 outer_src_mac[6];
    u8 outer_dst_mac[6];
    u16 outer_sport;
    u16 outer_dport;
    u32 ifindex;
    u64 last_seen_ns;
};

/* Not preallocated: it costs nothing unless GENEVE mode is used. */
SLUICE_MAP_FLAGS("hash", struct fw_session_key, struct fw_tunnel, fw_geneve_flows, FW_MAX_SESSIONS, BPF_F_NO_PREALLOC);
/* fw_geneve is close to the 512-byte stack limit: the tunnel record is built in this scratch slot. */
BPF_PERCPU_ARRAY(fw_tunnel_scratch, struct fw_tunnel, 1);

/* Parse the inner IP packet at off into pkt->flow (no extension headers: fail closed). */
static __always_inline int fw_parse_inner(struct __sk_buff *skb, u32 off, u16 ptype, struct sluice_pkt *pkt)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct sluice_flow *f = &pkt->flow;
    __builtin_memset(f, 0, sizeof(*f));
    if (off > 600)
        return SLUICE_PARSE_MALFORMED;
    if (ptype == ETH_P_IP) {
        struct iphdr *ip = data + off;
        if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5)
            return SLUICE_PARSE_MALFORMED;
        u32 hlen = ip->ihl * 4;
        if (data + off + hlen > data_end)
            return SLUICE_PARSE_MALFORMED;
        f->family = 4;
        f->proto = ip->protocol;
        sluice_v4_mapped(f->saddr, ip->saddr);
        sluice_v4_mapped(f->daddr, ip->daddr);
        u16 frag = bpf_ntohs(ip->frag_off);
        if (frag & 0x3fff)
            f->flags |= SLUICE_F_FRAGMENT;
        if (frag & 0x1fff)
            f->flags |= SLUICE_F_LATER_FRAG;
        return sluice_parse_l4(data, data_end, pkt, off + hlen);
    }
    if (ptype == ETH_P_IPV6) {
        struct ipv6hdr *ip6 = data + off;
        if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
            return SLUICE_PARSE_MALFORMED;
        f->family = 6;
        f->proto = ip6->nexthdr;
        __builtin_memcpy(f->saddr, &ip6->saddr, 16);
        __builtin_memcpy(f->daddr, &ip6->daddr, 16);
        if (f->proto == IPPROTO_HOPOPTS || f->proto == IPPROTO_ROUTING || f->proto == IPPROTO_DSTOPTS ||
            f->proto == IPPROTO_FRAGMENT)
            return SLUICE_PARSE_MALFORMED;
        return sluice_parse_l4(data, data_end, pkt, off + sizeof(*ip6));
    }
    return SLUICE_PARSE_MALFORMED;
}

static __always_inline void fw_remember_tunnel(struct fw_session_key *k, struct __sk_buff *skb,
                                               const struct sluice_pkt *outer, u32 vni, u32 opt_off,
                                               u32 optlen, u64 now)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    u32 zero = 0;
    struct fw_tunnel *t = fw_tunnel_scratch.lookup(&zero);
    if (!t)
        return;
    __builtin_memset(t, 0, sizeof(*t));
    t->type = TUNNEL_GENEVE;
    t->vni = vni;
    if (optlen >= 8 && opt_off < 600) {
        u8 *opt = data + opt_off;
        if ((void *)(opt + 8) <= data_end)
            __builtin_memcpy(t->cookie, opt, 8);
    }
    __builtin_memcpy(t->outer_src, outer->flow.saddr, 16);
    __builtin_memcpy(t->outer_dst, outer->flow.daddr, 16);
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) <= data_end) {
        __builtin_memcpy(t->outer_src_mac, eth->h_source, 6);
        __builtin_memcpy(t->outer_dst_mac, eth->h_dest, 6);
    }
    t->outer_sport = outer->flow.sport;
    t->outer_dport = outer->flow.dport;
    t->ifindex = skb->ifindex;
    t->last_seen_ns = now;
    fw_geneve_flows.update(k, t);
}

/* The outer headers of a GENEVE frame: Ethernet, IPv4 (options allowed, no fragments) or IPv6
 * (no extension headers), UDP. Much lighter for the verifier than sluice_parse, whose VLAN and
 * extension-header walks would multiply with the inner packet's. Returns 1 for UDP to port. */
static __always_inline int fw_parse_outer(struct __sk_buff *skb, struct sluice_pkt *pkt)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    __builtin_memset(pkt, 0, sizeof(*pkt));
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return 0;
    u32 off = sizeof(*eth);
    pkt->l3_off = off;
    struct sluice_flow *f = &pkt->flow;
    if (eth->h_proto == bpf_htons(ETH_P_IP)) {
        struct iphdr *ip = data + off;
        if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl < 5 || ip->protocol != IPPROTO_UDP ||
            (bpf_ntohs(ip->frag_off) & 0x3fff))
            return 0;
        f->family = 4;
        sluice_v4_mapped(f->saddr, ip->saddr);
        sluice_v4_mapped(f->daddr, ip->daddr);
        off += ip->ihl * 4;
    } else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
        struct ipv6hdr *ip6 = data + off;
        if ((void *)(ip6 + 1) > data_end || ip6->version != 6 || ip6->nexthdr != IPPROTO_UDP)
            return 0;
        f->family = 6;
        __builtin_memcpy(f->saddr, &ip6->saddr, 16);
        __builtin_memcpy(f->daddr, &ip6->daddr, 16);
        off += sizeof(*ip6);
    } else {
        return 0;
    }
    struct udphdr *uh = data + off;
    if (off > 128 || (void *)(uh + 1) > data_end)
        return 0;
    f->proto = IPPROTO_UDP;
    f->sport = bpf_ntohs(uh->source);
    f->dport = bpf_ntohs(uh->dest);
    pkt->l4_off = off;
    return f->dport == FW_GENEVE_PORT;
}

/* Return the frame to where it came from: MACs and outer IPs swapped, nothing else touched. */
static __always_inline int fw_bounce(struct __sk_buff *skb, const struct sluice_pkt *outer)
{
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    struct ethhdr *eth = data;
    if ((void *)(eth + 1) > data_end)
        return -1;
    u8 mac[6];
    __builtin_memcpy(mac, eth->h_source, 6);
    __builtin_memcpy(eth->h_source, eth->h_dest, 6);
    __builtin_memcpy(eth->h_dest, mac, 6);
    u32 l3 = outer->l3_off;
    if (l3 > 64)
        return -1;
    if (outer->flow.family == 4) {
        struct iphdr *ip = data + l3;
        if ((void *)(ip + 1) > data_end)
            return -1;
        __be32 a = ip->saddr;
        ip->saddr = ip->daddr;
        ip->daddr = a;
    } else {
        struct ipv6hdr *ip6 = data + l3;
        if ((void *)(ip6 + 1) > data_end)
            return -1;
        struct in6_addr a = ip6->saddr;
        ip6->saddr = ip6->daddr;
        ip6->daddr = a;
    }
    return bpf_redirect(skb->ifindex, 0);
}

/* Why fw_geneve decided what it did: detail[1] of its one trace report ("geneve"). */
#define G_RETURNED 1
#define G_DENIED 2
#define G_MALFORMED 3
#define G_SESSION_FULL 4

int fw_geneve(struct __sk_buff *skb)
{
    struct sluice_pkt outer;
    if (!fw_parse_outer(skb, &outer))
        return SLUICE_NEXT; /* not ours: the rest of the chain decides (and reports) */

    /* One exit, so the trace report is inlined once (this program is near the 4096-insn cap). */
    int verdict = SLUICE_DROP, why = G_MALFORMED;
    u32 vni = 0, dir = 0;
    struct fw_decision d = {};
    void *data = (void *)(long)skb->data;
    void *data_end = (void *)(long)skb->data_end;
    u32 goff = outer.l4_off + 8; /* past the UDP header */
    if (goff > 512)
        goto out;
    u8 *g = data + goff;
    if ((void *)(g + 8) > data_end)
        goto out;
    u32 optlen = (g[0] & 0x3f) * 4;
    u16 ptype = (g[2] << 8) | g[3];
    vni = (g[4] << 16) | (g[5] << 8) | g[6];
    if ((g[0] >> 6) != 0 || (ptype != ETH_P_IP && ptype != ETH_P_IPV6))
        goto out;
    /* Options are walked for their lengths: they must tile the declared option space exactly.
     * bpf_skb_load_bytes keeps packet ranges out of the loop's state, so the verifier can prune
     * the paths that leave it after different numbers of options. */
    u32 pos = 0;
#pragma clang loop unroll(disable)
    for (int i = 0; i < 16; i++) {
        if (pos >= optlen)
            break;
        u8 len = 0;
        if (bpf_skb_load_bytes(skb, goff + 8 + (pos & 0xff) + 3, &len, 1) < 0)
            goto out;
        pos += 4 + (len & 0x1f) * 4;
    }
    if (pos != optlen)
        goto out;

    u32 zero = 0;
    struct sluice_pkt *inner = fw_inner_scratch.lookup(&zero); /* stack: fw_geneve is near 512 bytes */
    if (!inner)
        goto out;
    __builtin_memset(inner, 0, sizeof(*inner));
    /* Inner fragments fail closed: no fragment record is kept per tunnelled flow. */
    if (fw_parse_inner(skb, goff + 8 + optlen, ptype, inner) != SLUICE_PARSE_OK ||
        (inner->flow.flags & SLUICE_F_FRAGMENT) || fw_mixed_family(inner))
        goto out;

    u64 now = bpf_ktime_get_ns();
    /* Both directions of a flow come through the load balancer: the session is either way round. */
    struct fw_session_key k;
    fw_wire_key(skb, inner, &k);
    struct fw_session *s = fw_sessions.lookup(&k);
    if (!s || !fw_session_live(s, inner->flow.proto, now)) {
        fw_flip(&k);
        s = fw_sessions.lookup(&k);
        dir = 1;
    }
    if (s && fw_session_live(s, inner->flow.proto, now)) {
        fw_session_touch(s, skb, inner, dir, now);
        fw_count(dir ? C_REPLIES : C_ALLOWED_ESTABLISHED);
    } else {
        dir = 0;
        fw_flip(&k); /* back to the wire's direction: the sender opens the flow */
        u32 gen = fw_generation();
        fw_decide(gen, inner, &d, now);
        /* Both directions arrive here: a new flow from outside toward a client is unsolicited. */
        if (d.action == ACT_BYPASS) {
            d.action = ACT_ALLOW; /* management traffic is returned like any allowed flow */
        } else if (d.reason == R_UNMATCHED && fw_setting(S_DROP_UNSOLICITED) &&
                   fw_is_client(gen, inner->flow.daddr)) {
            d.action = ACT_DENY;
            d.reason = R_UNSOLICITED;
        }
        fw_require_syn(inner, &d);
        if (d.action != ACT_ALLOW) {
            fw_report(skb, inner, d.net_id, d.order, ACT_DENY, d.reason, 0);
            why = G_DENIED;
            if (!fw_setting(S_AUDIT_MODE)) {
                fw_count(C_BLOCKED_POLICY);
                goto out;
            }
            fw_count(C_AUDIT_WOULD_BLOCK);
        }
        if (fw_new_session(&k, skb, inner, &d, d.action == ACT_ALLOW ? 0 : FW_SF_AUDIT, now) != 0) {
            fw_count(C_SESSION_FULL);
            why = G_SESSION_FULL;
            goto out;
        }
        fw_count(C_ALLOWED_NEW);
        fw_remember_tunnel(&k, skb, &outer, vni, goff + 8, optlen, now);
    }
    why = G_MALFORMED;
    verdict = fw_bounce(skb, &outer);
    if (verdict < 0) {
        verdict = SLUICE_DROP;
        goto out;
    }
    why = G_RETURNED;
    fw_count(C_REDIRECTED);
out:
    if (why == G_MALFORMED) {
        fw_count(C_BLOCKED_MALFORMED);
        if (!fw_setting(S_DROP_MALFORMED))
            verdict = SLUICE_NEXT;
    }
    return sluice_verdict_detail(skb, &outer, verdict, "geneve", vni, why, d.net_id, dir);
}

/* ---- ILB mode: SNAT of allowed flows to the egress address (IPv4 TCP and UDP) ----
 *
 * Packets arrive unencapsulated from an internal load balancer and leave through the egress
 * interface. fw_ilb_out (TC egress there) rewrites the source of a flow that has a session to
 * the configured address and a port allocated once per session; fw_ilb_in (TC ingress there)
 * translates the replies back before routing, so fw_egress then finds the session as usual.
 * Each translation lives in fw_nat keyed by what the reply carries and names its session; GC
 * removes it with the session.
 */
struct fw_ilb_cfg {
    __be32 addr; /* SNAT address (network order) */
    u16 port_lo;
    u16 port_hi;
};

struct fw_nat_key { /* a reply as it arrives: from the server, to the SNAT port */
    u8 peer[16];
    u16 peer_port;
    u16 nat_port;
    u8 proto;
    u8 pad[3];
};

SLUICE_MAP("array", u32, struct fw_ilb_cfg, fw_ilb, 1);
/* Not preallocated: it costs nothing unless ILB mode is used. */
SLUICE_MAP_FLAGS("hash", struct fw_nat_key, struct fw_session_key, fw_nat, FW_MAX_SESSIONS, BPF_F_NO_PREALLOC);

static __always_inline int fw_l4_csum_off(u8 proto)
{
    return proto == IPPROTO_TCP ? 16 : 6;
}

/* Rewrite the IPv4 address at addr_off and the port at port_off, fixing both checksums. */
static __always_inline int fw_rewrite(struct __sk_buff *skb, const struct sluice_pkt *pkt, u32 addr_off,
                                      __be32 old_addr, __be32 new_addr, u32 port_off, __be16 old_port,
                                      __be16 new_port)
{
    sluice_packet_changed(skb); /* programs after this one parse the rewritten packet */
    u32 ip_csum = pkt->l3_off + offsetof(struct iphdr, check);
    u32 l4_csum = pkt->l4_off + fw_l4_csum_off(pkt->flow.proto);
    u64 flags = BPF_F_PSEUDO_HDR | (pkt->flow.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0);
    if (bpf_l4_csum_replace(skb, l4_csum, old_addr, new_addr, flags | 4) < 0)
        return -1;
    if (bpf_l4_csum_replace(skb, l4_csum, old_port, new_port,
                            (pkt->flow.proto == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0) | 2) < 0)
        return -1;
    if (bpf_l3_csum_replace(skb, ip_csum, old_addr, new_addr, 4) < 0)
        return -1;
    if (bpf_skb_store_bytes(skb, addr_off, &new_addr, 4, 0) < 0)
        return -1;
    return bpf_skb_store_bytes(skb, port_off, &new_port, 2, 0);
}

static __always_inline int fw_ilb_candidate(struct __sk_buff *skb, struct sluice_pkt *pkt)
{
    int parsed = sluice_parse(skb, pkt);
    if (parsed != SLUICE_PARSE_OK)
        return 0;
    if (pkt->flow.family != 4 || (pkt->flow.flags & SLUICE_F_FRAGMENT))
        return 0;
    if (pkt->flow.proto != IPPROTO_TCP && pkt->flow.proto != IPPROTO_UDP)
        return 0;
    return pkt->l3_off < 64 && pkt->l4_off < 128;
}

int fw_ilb_out(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    if (!fw_ilb_candidate(skb, &pkt))
        return SLUICE_NEXT;
    u32 zero = 0;
    struct fw_ilb_cfg *cfg = fw_ilb.lookup(&zero);
    if (!cfg || !cfg->addr)
        return SLUICE_NEXT;
    struct fw_session_key k;
    fw_wire_key(skb, &pkt, &k);
    struct fw_session *s = fw_sessions.lookup(&k);
    if (!s)
        return SLUICE_NEXT; /* not a client's flow (the gateway's own traffic, say) */
    if (!s->nat_port) {
        if (!fw_setting(S_ILB_SNAT))
            return SLUICE_NEXT;
        struct fw_nat_key nk = {};
        __builtin_memcpy(nk.peer, k.daddr, 16);
        nk.peer_port = k.dport;
        nk.proto = k.proto;
        u32 span = cfg->port_hi >= cfg->port_lo ? (u32)(cfg->port_hi - cfg->port_lo) + 1 : 1;
        u32 h = bpf_get_prandom_u32();
#pragma clang loop unroll(disable)
        for (int i = 0; i < 8; i++) {
            nk.nat_port = cfg->port_lo + (h + i * 7919) % span;
            if (fw_nat.insert(&nk, &k) == 0) { /* BPF_NOEXIST: a port taken by another flow is skipped */
                s->nat_port = nk.nat_port;
                break;
            }
        }
        if (!s->nat_port) {
            fw_count(C_NAT_EXHAUSTED);
            return sluice_verdict(skb, &pkt, SLUICE_DROP, "nat-exhausted");
        }
    }
    __be32 old_addr = 0;
    bpf_skb_load_bytes(skb, pkt.l3_off + offsetof(struct iphdr, saddr), &old_addr, 4);
    if (fw_rewrite(skb, &pkt, pkt.l3_off + offsetof(struct iphdr, saddr), old_addr, cfg->addr, pkt.l4_off,
                   bpf_htons(pkt.flow.sport), bpf_htons(s->nat_port)) < 0)
        return sluice_verdict(skb, &pkt, SLUICE_DROP, "snat-failed");
    return sluice_verdict_detail(skb, &pkt, SLUICE_NEXT, "snat", s->nat_port, 0, 0, 0);
}

int fw_ilb_in(struct __sk_buff *skb)
{
    struct sluice_pkt pkt;
    if (!fw_ilb_candidate(skb, &pkt))
        return SLUICE_NEXT;
    u32 zero = 0;
    struct fw_ilb_cfg *cfg = fw_ilb.lookup(&zero);
    if (!cfg || !cfg->addr)
        return SLUICE_NEXT;
    __be32 dst = 0;
    bpf_skb_load_bytes(skb, pkt.l3_off + offsetof(struct iphdr, daddr), &dst, 4);
    if (dst != cfg->addr)
        return SLUICE_NEXT;
    struct fw_nat_key nk = {};
    __builtin_memcpy(nk.peer, pkt.flow.saddr, 16);
    nk.peer_port = pkt.flow.sport;
    nk.nat_port = pkt.flow.dport;
    nk.proto = pkt.flow.proto;
    struct fw_session_key *orig = fw_nat.lookup(&nk);
    if (!orig)
        return SLUICE_NEXT; /* addressed to the gateway itself */
    __be32 client;
    __builtin_memcpy(&client, orig->saddr + 12, 4);
    if (fw_rewrite(skb, &pkt, pkt.l3_off + offsetof(struct iphdr, daddr), dst, client, pkt.l4_off + 2,
                   bpf_htons(pkt.flow.dport), bpf_htons(orig->sport)) < 0)
        return sluice_verdict(skb, &pkt, SLUICE_DROP, "unsnat-failed");
    return sluice_verdict_detail(skb, &pkt, SLUICE_NEXT, "unsnat", nk.nat_port, 0, 0, 0);
}
