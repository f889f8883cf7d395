/* sluice/maps.h: declare-once macros for maps pinned under bpffs.
 *
 * SLUICE_MAP pins at <bpffs>/sluice/<plugin>/<name>; SLUICE_CORE_MAP at <bpffs>/sluice/core/<name>
 * (maps every plugin shares, like the trace switch). The loader defines SLUICE_PIN_DIR and
 * SLUICE_CORE_PIN_DIR and, after BCC created or reused each pin, checks that a reused pin has the
 * declared type, key size, value size and max_entries (BCC itself does not check).
 */
#ifndef SLUICE_MAPS_H
#define SLUICE_MAPS_H

#ifndef SLUICE_PIN_DIR
#error "SLUICE_PIN_DIR is set by the sluice loader"
#endif

/* type is BCC's map type string: "hash", "lru_hash", "array", "percpu_array", "lpm_trie", ... */
#define SLUICE_MAP(type, key_t, value_t, name, max_entries) \
    BPF_TABLE_PINNED(type, key_t, value_t, name, max_entries, SLUICE_PIN_DIR "/" #name)

#define SLUICE_MAP_FLAGS(type, key_t, value_t, name, max_entries, flags) \
    BPF_TABLE_PINNED7(type, key_t, value_t, name, max_entries, SLUICE_PIN_DIR "/" #name, flags)

#define SLUICE_CORE_MAP(type, key_t, value_t, name, max_entries) \
    BPF_TABLE_PINNED(type, key_t, value_t, name, max_entries, SLUICE_CORE_PIN_DIR "/" #name)

/* A pinned BPF ring buffer with BCC's ringbuf_output/reserve/submit/discard methods.
 * BCC 0.26 has no pinned variant of BPF_RINGBUF_OUTPUT; this is the same table with a pin path. */
#define SLUICE_RINGBUF_AT(pin, _name, _num_pages)                              \
    struct _name##_table_t {                                                \
        int key;                                                            \
        u32 leaf;                                                           \
        int (*ringbuf_output)(void *, u64, u64);                            \
        void *(*ringbuf_reserve)(u64);                                      \
        void (*ringbuf_discard)(void *, u64);                               \
        void (*ringbuf_submit)(void *, u64);                                \
        u64 (*ringbuf_query)(u64);                                          \
        u32 max_entries;                                                    \
    };                                                                      \
    __attribute__((section("maps/ringbuf:" pin))) struct _name##_table_t _name = { \
        .max_entries = ((_num_pages) * PAGE_SIZE)};                         \
    BPF_ANNOTATE_KV_PAIR(_name, int, u32)

#define SLUICE_RINGBUF(_name, _num_pages) SLUICE_RINGBUF_AT(SLUICE_PIN_DIR "/" #_name, _name, _num_pages)
#define SLUICE_CORE_RINGBUF(_name, _num_pages) \
    SLUICE_RINGBUF_AT(SLUICE_CORE_PIN_DIR "/" #_name, _name, _num_pages)

#endif
