//! xesp's IKEv2 controller.
//!
//! * [`proto`]: the sans-IO IKEv2 core (RFC 7296): no sockets, no clock, no
//!   global randomness; datagrams and time go in, datagrams, timers and
//!   events come out.

pub mod proto;
