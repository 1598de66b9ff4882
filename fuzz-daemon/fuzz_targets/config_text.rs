//! Whatever a user writes, `xesp check`, `xesp azure import` and
//! `xesp azure allowlist` answer with an error, never a panic: any text as
//! xesp.toml, and any JSON as a gateway, a connection, a community list or a
//! Service Tags file.
#![no_main]

use std::{net::Ipv4Addr, path::Path};

use ike_control::{
    azure::{
        allowlist::{from_communities, from_service_tags},
        import::{OnPrem, Options, import},
        json::{Node, parse},
    },
    config::Config,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // A psk_file is read from disk: keep the fuzzer off the file system.
    if !text.contains("psk_file") {
        let _ = Config::parse(text, Path::new("/nonexistent/xesp.toml"));
    }
    let Ok(v) = parse(text, "f.json") else {
        return;
    };
    let node = Node::root(&v, "f.json");
    let onprem = OnPrem {
        public_address: Ipv4Addr::new(192, 0, 2, 1),
        dmz_interface: "dmz0".into(),
        lan_interface: "lan0".into(),
        loopback: Ipv4Addr::new(172, 16, 0, 3),
        tunnel_addresses: vec![Ipv4Addr::new(172, 16, 0, 1), Ipv4Addr::new(172, 16, 0, 2)],
        asn: 65010,
        networks: vec!["10.0.0.0/24".parse().unwrap_or_else(|_| unreachable!())],
    };
    let opts = Options {
        psk_file: "xesp.psk".into(),
        ..Options::default()
    };
    if let Ok(i) = import(&node, Some(&node), &onprem, &opts) {
        let _ = Config::parse(&i.toml(), Path::new("/nonexistent/xesp.toml"));
    }
    let _ = from_communities(&node, &["12076:51026".into()], &mut vec![]);
    let _ = from_service_tags(&node, &["AzureCloud.westus2".into()]);
});
