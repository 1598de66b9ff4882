//! The strongSwan 5.9.8 capture, IKE side: from its IKE_SA_INIT messages and
//! the DH shared secret, SKEYSEED and SK_d/ei/er/ai/ar come out as strongSwan
//! logged them; IKE_AUTH and CREATE_CHILD_SA decrypt; both AUTH payloads
//! verify with the PSK; the CHILD_SAs' ESP keys come out as logged.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use ike_proto::{
    codec::{Body, ExchangeType, Message, Payload},
    crypto::{Prf, Psk, child_keymat, derive_ike_keys, psk_auth, psk_auth_ok, skeyseed},
    sk::SkCipher,
};
use xesp_esp::alg::{AesKeyBits, Encr, Integ, Suite};
use xesp_tests::{data_dir, read_pcap, unhex};

/// IKE messages (UDP payload, non-ESP marker removed) in capture order.
fn ike_messages() -> Vec<Vec<u8>> {
    read_pcap(&data_dir().join("strongswan-5.9.8-libipsec/capture.pcap"))
        .into_iter()
        .filter_map(|f| {
            let ip = &f[14..];
            let ihl = usize::from(ip[0] & 0xf) * 4;
            if ip[9] != 17 {
                return None;
            }
            let udp = &ip[ihl..];
            let dport = u16::from_be_bytes([udp[2], udp[3]]);
            let payload = &udp[8..];
            match dport {
                500 => Some(payload.to_vec()),
                4500 if payload.starts_with(&[0, 0, 0, 0]) => Some(payload[4..].to_vec()),
                _ => None,
            }
        })
        .collect()
}

fn find(payloads: &[Payload], f: impl Fn(&Body) -> bool) -> &Body {
    &payloads.iter().find(|p| f(&p.body)).unwrap().body
}

fn nonce(payloads: &[Payload]) -> Vec<u8> {
    match find(payloads, |b| matches!(b, Body::Nonce(_))) {
        Body::Nonce(n) => n.clone(),
        _ => unreachable!(),
    }
}

#[test]
fn strongswan_capture_ike_keys_auth_and_child_keys() {
    let keys: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data_dir().join("strongswan-5.9.8-libipsec/keys.json")).unwrap(),
    )
    .unwrap();
    let ike = &keys["ike_sas"][0];
    assert_eq!(
        ike["alg"],
        "AES_CBC_256/HMAC_SHA2_256_128/PRF_HMAC_SHA2_256/MODP_2048"
    );
    let hexkey = |name: &str| unhex(ike[name].as_str().unwrap());

    let msgs = ike_messages();
    assert_eq!(
        msgs.len(),
        6,
        "IKE_SA_INIT, IKE_AUTH and CREATE_CHILD_SA, request and response each"
    );
    let parsed: Vec<Message> = msgs.iter().map(|m| Message::parse(m).unwrap()).collect();
    // Parsing and emitting the plaintext messages gives back the captured octets.
    assert_eq!(parsed[0].emit(), msgs[0]);
    assert_eq!(parsed[1].emit(), msgs[1]);
    let exchanges: Vec<ExchangeType> = parsed.iter().map(|m| m.header.exchange).collect();
    assert_eq!(
        exchanges,
        [
            ExchangeType::IKE_SA_INIT,
            ExchangeType::IKE_SA_INIT,
            ExchangeType::IKE_AUTH,
            ExchangeType::IKE_AUTH,
            ExchangeType::CREATE_CHILD_SA,
            ExchangeType::CREATE_CHILD_SA
        ]
    );
    let (spi_i, spi_r) = (parsed[1].header.spi_i, parsed[1].header.spi_r);
    assert_eq!(format!("{spi_i:016x}"), ike["ispi"].as_str().unwrap());
    assert_eq!(format!("{spi_r:016x}"), ike["rspi"].as_str().unwrap());
    let (ni, nr) = (nonce(&parsed[0].payloads), nonce(&parsed[1].payloads));

    // §2.14: SKEYSEED and the SK_* keys.
    let prf = Prf::HmacSha2_256;
    let seed = skeyseed(prf, &ni, &nr, &hexkey("dh_secret"));
    assert_eq!(*seed, hexkey("skeyseed"));
    let suite = Suite::new(
        Encr::AesCbc(AesKeyBits::B256),
        Some(Integ::HmacSha2_256_128),
    )
    .unwrap();
    let k = derive_ike_keys(prf, &seed, &ni, &nr, spi_i, spi_r, suite);
    for (name, got) in [
        ("sk_d", &k.sk_d),
        ("sk_ai", &k.sk_ai),
        ("sk_ar", &k.sk_ar),
        ("sk_ei", &k.sk_ei),
        ("sk_er", &k.sk_er),
    ] {
        assert_eq!(**got, hexkey(name), "{name}");
    }

    // §3.14: the encrypted exchanges open with the initiator's and the responder's keys.
    let from_i = SkCipher::new(suite, &k.sk_ei, &k.sk_ai).unwrap();
    let from_r = SkCipher::new(suite, &k.sk_er, &k.sk_ar).unwrap();
    let auth_req = from_i.open(&msgs[2], &parsed[2]).unwrap();
    let auth_resp = from_r.open(&msgs[3], &parsed[3]).unwrap();
    let child_req = from_i.open(&msgs[4], &parsed[4]).unwrap();
    let child_resp = from_r.open(&msgs[5], &parsed[5]).unwrap();
    assert!(
        from_r.open(&msgs[2], &parsed[2]).is_err(),
        "the wrong direction's key must fail"
    );

    // §2.15: both AUTH payloads verify with the PSK.
    let psk = Psk::new(b"secret*1234");
    let id = |ps: &[Payload]| match find(ps, |b| matches!(b, Body::IdI(_) | Body::IdR(_))) {
        Body::IdI(i) | Body::IdR(i) => i.body(),
        _ => unreachable!(),
    };
    let auth = |ps: &[Payload]| match find(ps, |b| matches!(b, Body::Auth { .. })) {
        Body::Auth { data, .. } => data.clone(),
        _ => unreachable!(),
    };
    let want_i = psk_auth(prf, &psk, &msgs[0], &nr, &k.sk_pi, &id(&auth_req));
    let want_r = psk_auth(prf, &psk, &msgs[1], &ni, &k.sk_pr, &id(&auth_resp));
    assert!(psk_auth_ok(&want_i, &auth(&auth_req)), "initiator AUTH");
    assert!(psk_auth_ok(&want_r, &auth(&auth_resp)), "responder AUTH");
    let wrong = psk_auth(
        prf,
        &Psk::new(b"secret*12345"),
        &msgs[0],
        &nr,
        &k.sk_pi,
        &id(&auth_req),
    );
    assert!(
        !psk_auth_ok(&wrong, &auth(&auth_req)),
        "a wrong PSK must not verify"
    );

    // §2.17: the CHILD_SAs' keys. The first comes with IKE_AUTH (nonces of
    // IKE_SA_INIT), the second with CREATE_CHILD_SA (its own nonces, no PFS).
    let esp = keys["esp_sas"].as_array().unwrap();
    let esp_key = |spi: &[u8]| {
        let hex: String = spi.iter().map(|b| format!("{b:02x}")).collect();
        unhex(
            esp.iter().find(|s| s["spi"] == hex.as_str()).unwrap()["encr_key"]
                .as_str()
                .unwrap(),
        )
    };
    let spi = |ps: &[Payload]| match find(ps, |b| matches!(b, Body::Sa(_))) {
        Body::Sa(p) => p[0].spi.clone(),
        _ => unreachable!(),
    };
    let gcm = Suite::new(Encr::AesGcm16(AesKeyBits::B256), None).unwrap();
    for (req, resp, n_i, n_r) in [
        (&auth_req, &auth_resp, ni.clone(), nr.clone()),
        (
            &child_req,
            &child_resp,
            nonce(&child_req),
            nonce(&child_resp),
        ),
    ] {
        let keymat = child_keymat(prf, &k.sk_d, None, &n_i, &n_r, 2 * gcm.keymat_len());
        // Initiator to responder first: the SPI the responder chose.
        assert_eq!(keymat[..36].to_vec(), esp_key(&spi(resp)), "i->r key");
        assert_eq!(keymat[36..].to_vec(), esp_key(&spi(req)), "r->i key");
    }
}
