//! xesp's IKEv2 controller.
//!
//! * [`proto`]: the sans-IO IKEv2 core (RFC 7296): no sockets, no clock, no
//!   global randomness; datagrams and time go in, datagrams, timers and
//!   events come out;
//! * [`backend`]: the [`backend::SaBackend`] trait between the controller and
//!   a datapath, and a recording mock;
//! * [`config`]: the `xesp.toml` file;
//! * [`daemon`]: `xesp run`, the tokio driver, and [`control`], its socket.

pub mod azure;
pub mod backend;
pub mod bgp_config;
pub mod config;
pub mod control;
pub mod daemon;
pub mod proto;
