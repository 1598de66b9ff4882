//! datapath-ebpf
