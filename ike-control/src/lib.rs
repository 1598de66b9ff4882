//! The xesp daemon around the sans-IO IKEv2 core ([`ike_proto`]).
//!
//! * [`config`]: the `xesp.toml` file, checked field by field;
//! * [`daemon`]: `xesp run`, the tokio driver that wires the IKE
//!   connections, the chosen datapath ([`datapath_user::mode`]) and the
//!   control socket;
//! * [`control`]: the control socket and `xesp status`;
//! * [`metrics`]: Prometheus metrics from the status;
//! * [`logging`]: text, journald or JSON logs through `tracing`;
//! * [`azure`]: `xesp azure import|export|allowlist`;
//! * [`bgp_config`]: `xesp bgp-config --bird`;
//! * [`service`]: the capability check at start, systemd notifications.

pub mod azure;
pub mod bgp_config;
pub mod config;
pub mod control;
pub mod daemon;
pub mod logging;
pub mod metrics;
pub mod service;
