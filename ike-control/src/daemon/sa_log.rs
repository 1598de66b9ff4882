//! The daemon's own events about SAs with structured fields, so that JSON
//! lines and the journal carry them as fields and not only in the message:
//! `tunnel`, `peer`, `spi` (hex; a CHILD_SA's inbound/outbound SPIs),
//! `ike_spi` (the IKE_SA's initiator/responder SPIs) and `exchange` where
//! one follows. SPIs only: never a key.

use std::net::IpAddr;

use ike_proto::{
    connection::{ChildSpis, IkeSpis, Level},
    status::ConnStatus,
};

/// The tunnel has an outbound SA: its routed CHILD_SA's SPIs, its IKE_SA's.
pub fn tunnel_up(tunnel: &str, peer: IpAddr, st: &ConnStatus) {
    let child = st
        .children
        .iter()
        .find(|c| c.routed)
        .or_else(|| st.children.first());
    let spi = child
        .map(|c| format!("{}/{}", c.spi_in, c.spi_out))
        .unwrap_or_default();
    let ike_spi = st
        .ike
        .as_ref()
        .map(|i| format!("{}/{}", i.spi_i, i.spi_r))
        .unwrap_or_default();
    tracing::info!(
        tunnel,
        %peer,
        spi = spi.as_str(),
        ike_spi = ike_spi.as_str(),
        "{tunnel}: tunnel up, CHILD_SA {spi}"
    );
}

/// SA `spi` reached a lifetime limit in the datapath: a soft one starts a
/// rekey (CREATE_CHILD_SA, RFC 7296 §2.8), a hard one removes it.
pub fn expiry(tunnel: &str, peer: IpAddr, spi: u32, direction: &str, hard: bool, limit: &str) {
    let spi_hex = format!("{spi:08x}");
    if hard {
        tracing::warn!(
            tunnel,
            %peer,
            spi = spi_hex.as_str(),
            direction,
            "{tunnel}: {direction} SA {spi_hex} reached its hard {limit} limit: removed"
        );
    } else {
        tracing::info!(
            tunnel,
            %peer,
            spi = spi_hex.as_str(),
            direction,
            exchange = "CREATE_CHILD_SA",
            "{tunnel}: {direction} SA {spi_hex} reached its soft {limit} limit: rekeying"
        );
    }
}

/// What a message of the IKE core is about, as fields of its line.
#[derive(Debug, Default, Clone, Copy)]
pub struct About {
    /// The exchange, when it is about one.
    pub exchange: Option<&'static str>,
    /// The IKE_SA whose message or timer it comes from.
    pub ike_spi: Option<IkeSpis>,
    /// The CHILD_SA it is about.
    pub spi: Option<ChildSpis>,
}

/// A message of the IKE core about tunnel `tunnel` (its text starts with
/// the tunnel's name already), with what it is about as fields.
pub fn core_message(tunnel: &str, peer: IpAddr, level: Level, about: About, message: &str) {
    // As strings, like the other SPI fields (quoted in the text format).
    let ike_spi = about.ike_spi.map(|s| s.to_string());
    let spi = about.spi.map(|s| s.to_string());
    let (ike_spi, spi, exchange) = (ike_spi.as_deref(), spi.as_deref(), about.exchange);
    match level {
        Level::Debug => tracing::debug!(tunnel, %peer, exchange, ike_spi, spi, "{message}"),
        Level::Info => tracing::info!(tunnel, %peer, exchange, ike_spi, spi, "{message}"),
        Level::Warn => tracing::warn!(tunnel, %peer, exchange, ike_spi, spi, "{message}"),
        Level::Error => tracing::error!(tunnel, %peer, exchange, ike_spi, spi, "{message}"),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// What the JSON layer (`--log-format json`) writes while `f` runs.
    fn json_lines(f: impl FnOnce()) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let w = buf.clone();
        let sub = tracing_subscriber::fmt()
            .json()
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn status() -> ConnStatus {
        serde_json::from_value(serde_json::json!({
            "name": "Tunnel0", "tunnel": 0, "peer": "203.0.113.11", "up": true,
            "established_secs_ago": 0,
            "ike": {
                "spi_i": "16cab2fef4d31f26", "spi_r": "27a34fa96433edac", "role": "initiator",
                "state": "ESTABLISHED", "local": "192.0.2.1:4500", "remote": "203.0.113.11:4500",
                "nat_t": true, "encryption": null, "key_size": null, "prf": null,
                "integrity": null, "dh_group": null, "auth": "psk", "lifetime_secs": 28800,
                "active_secs": 1, "rekey_in_secs": null
            },
            "children": [{
                "spi_in": "ddfa6299", "spi_out": "50cef31e", "state": "INSTALLED",
                "routed": true, "suite": "AES-GCM-16-256", "local_ts": [], "remote_ts": [],
                "packets_in": 0, "bytes_in": 0, "packets_out": 0, "bytes_out": 0,
                "drops_in": 0, "drops_out": 0, "age_secs": 0, "rekey_in_secs": 3000,
                "lifetime_secs": 3600
            }],
            "stats": serde_json::to_value(ike_proto::status::ConnStats::default()).unwrap()
        }))
        .unwrap()
    }

    #[test]
    fn a_tunnel_up_carries_its_spis_as_json_fields() {
        let peer: IpAddr = "203.0.113.11".parse().unwrap();
        let lines = json_lines(|| tunnel_up("Tunnel0", peer, &status()));
        assert_eq!(lines.len(), 1, "{lines:?}");
        let f = &lines[0]["fields"];
        assert_eq!(f["tunnel"], "Tunnel0");
        assert_eq!(f["peer"], "203.0.113.11");
        assert_eq!(f["spi"], "ddfa6299/50cef31e");
        assert_eq!(f["ike_spi"], "16cab2fef4d31f26/27a34fa96433edac");
        assert_eq!(lines[0]["level"], "INFO");
    }

    #[test]
    fn a_soft_expiry_names_the_rekey_exchange() {
        let peer: IpAddr = "203.0.113.12".parse().unwrap();
        let lines = json_lines(|| {
            expiry("Tunnel1", peer, 0xc0ffee, "inbound", false, "Bytes");
            expiry("Tunnel1", peer, 0xc0ffee, "inbound", true, "Bytes");
        });
        let (soft, hard) = (&lines[0]["fields"], &lines[1]["fields"]);
        assert_eq!(soft["spi"], "00c0ffee");
        assert_eq!(soft["exchange"], "CREATE_CHILD_SA");
        assert_eq!(soft["direction"], "inbound");
        assert_eq!(hard["spi"], "00c0ffee");
        assert!(hard.get("exchange").is_none());
        assert_eq!(lines[1]["level"], "WARN");
    }

    #[test]
    fn a_core_message_carries_its_exchange_and_spis_when_it_has_them() {
        let peer: IpAddr = "203.0.113.11".parse().unwrap();
        let lines = json_lines(|| {
            core_message(
                "Tunnel0",
                peer,
                Level::Error,
                About {
                    exchange: Some("IKE_AUTH"),
                    ike_spi: Some(IkeSpis {
                        initiator: 0x0011_2233_4455_6677,
                        responder: 0x8899_aabb_ccdd_eeff,
                    }),
                    spi: None,
                },
                "Tunnel0: IKE_AUTH: authentication of peer failed",
            );
            core_message(
                "Tunnel0",
                peer,
                Level::Info,
                About::default(),
                "Tunnel0: opened",
            );
            core_message(
                "Tunnel0",
                peer,
                Level::Info,
                About {
                    spi: Some(ChildSpis {
                        inbound: 0xc0ff_ee01,
                        outbound: Some(0x0bad_f00d),
                    }),
                    ..About::default()
                },
                "Tunnel0: CHILD_SA c0ffee01_i 0badf00d_o deleted",
            );
        });
        let (auth, opened, deleted) = (
            &lines[0]["fields"],
            &lines[1]["fields"],
            &lines[2]["fields"],
        );
        assert_eq!(auth["exchange"], "IKE_AUTH");
        assert_eq!(auth["ike_spi"], "0011223344556677/8899aabbccddeeff");
        assert!(auth.get("spi").is_none(), "{auth}");
        assert_eq!(deleted["spi"], "c0ffee01/0badf00d");
        assert!(opened.get("ike_spi").is_none(), "{opened}");
        assert_eq!(auth["tunnel"], "Tunnel0");
        assert_eq!(auth["peer"], "203.0.113.11");
        assert_eq!(lines[0]["level"], "ERROR");
        assert!(opened.get("exchange").is_none(), "{opened}");
        assert_eq!(opened["tunnel"], "Tunnel0");
        // The core's text already names the tunnel: once is enough.
        assert_eq!(opened["message"], "Tunnel0: opened");
    }
}
