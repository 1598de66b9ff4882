//! ike-control
