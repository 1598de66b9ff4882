//! The benchmarks of xesp.
//!
//! * `benches/esp.rs` (criterion, `cargo bench -p xesp-benches`): the ESP
//!   core per packet next to the raw ring AEAD;
//! * `benches/ike.rs` (criterion, `--bench ike`): complete IKE_SA setups
//!   per second next to the raw DH operations of the same group;
//! * `xesp-loadgen` ([`serve`], [`peer`], [`traffic`]): the ends of
//!   `cargo xtask bench`, which measures whole devices in namespaces.

pub mod afxdp;
pub mod peer;
pub mod serve;
pub mod traffic;
