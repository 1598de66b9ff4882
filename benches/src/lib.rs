//! Benchmarks live in `benches/`; `cargo bench -p xesp-benches` runs them.
