/* sluice/common.h: what every sluice BPF program includes first.
 *
 * The verdict convention on a shared TC hook: programs on one (interface, direction) run in their
 * declared order. A program without an opinion returns SLUICE_NEXT so the next one runs; a drop
 * or redirect ends the chain. Observers always return SLUICE_NEXT.
 */
#ifndef SLUICE_COMMON_H
#define SLUICE_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>

#define SLUICE_NEXT TC_ACT_UNSPEC /* no opinion: the next program in the chain decides */
#define SLUICE_PASS TC_ACT_OK     /* accept now; programs later in the chain do not run */
#define SLUICE_DROP TC_ACT_SHOT

#ifndef SLUICE_PLUGIN
#define SLUICE_PLUGIN "unknown" /* set by the loader: -DSLUICE_PLUGIN="\"<plugin>\"" */
#endif

#define sluice_likely(x) __builtin_expect(!!(x), 1)
#define sluice_unlikely(x) __builtin_expect(!!(x), 0)

#endif
