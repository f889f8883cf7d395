"""The shared BPF C headers (bpf/include), shipped as package data."""
