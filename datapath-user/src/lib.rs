//! datapath-user
