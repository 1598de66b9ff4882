//! xesp-benches
