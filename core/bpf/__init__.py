"""BPF plumbing: libbpf bindings, typed map views, program test runs and the BCC loader."""
