//! Azure's `ipsecPolicies[]` and xesp's proposals, both ways. Azure's `ike*`
//! and `dhGroup` describe the IKE_SA, `ipsec*`, `pfsGroup` and the lifetimes
//! the CHILD_SA; its enum names (`GCMAES256`, `DHGroup14`, `PFS2048`, ...)
//! are matched case-insensitively.

use serde::Serialize;
use xesp_esp::alg::{AesKeyBits, Encr, Integ};

use super::{AzureError, json::Node};
use ike_proto::{
    config::{EspProposal, IkeProposal},
    crypto::{DhGroup, Prf},
};

/// The fields of one `ipsecPolicies[]` entry.
pub const POLICY_FIELDS: [&str; 8] = [
    "saLifeTimeSeconds",
    "saDataSizeKilobytes",
    "ipsecEncryption",
    "ipsecIntegrity",
    "ikeEncryption",
    "ikeIntegrity",
    "dhGroup",
    "pfsGroup",
];

/// Azure's ranges for the CHILD_SA lifetimes of a custom policy.
pub const SA_LIFETIME_SECONDS: (u64, u64) = (300, 172_799);
pub const SA_DATA_SIZE_KB: (u64, u64) = (1024, 2_147_483_647);

/// One `ipsecPolicies[]` entry as Azure writes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AzurePolicy {
    pub sa_life_time_seconds: u64,
    pub sa_data_size_kilobytes: u64,
    pub ipsec_encryption: &'static str,
    pub ipsec_integrity: &'static str,
    pub ike_encryption: &'static str,
    pub ike_integrity: &'static str,
    pub dh_group: &'static str,
    pub pfs_group: &'static str,
}

/// A policy read from Azure, as xesp's proposal strings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedPolicy {
    /// e.g. `aes256-sha256-modp2048`.
    pub ike: String,
    /// e.g. `aes256gcm16` or `aes256-sha1-modp2048`.
    pub esp: String,
    pub child_lifetime_secs: u64,
    pub child_lifetime_kb: u64,
    /// Uses DH group 2 or 3DES (needs allow_legacy).
    pub legacy: bool,
}

fn unsupported(n: &Node<'_>, why: &str) -> AzureError {
    n.invalid(why.to_string())
}

fn enum_of<'a>(p: &Node<'a>, key: &str) -> Result<(Node<'a>, String), AzureError> {
    let n = p.req(key, "every field of an ipsecPolicies entry is required")?;
    let s = n.str()?.to_ascii_uppercase();
    Ok((n, s))
}

/// Reads one `ipsecPolicies[]` entry.
pub fn import_policy(p: &Node<'_>) -> Result<ImportedPolicy, AzureError> {
    p.only(&POLICY_FIELDS)?;
    let mut legacy = false;
    let (n, ike_enc) = enum_of(p, "ikeEncryption")?;
    let (ike_enc_kw, ike_gcm) = match ike_enc.as_str() {
        "AES256" => ("aes256", false),
        "AES192" => ("aes192", false),
        "AES128" => ("aes128", false),
        "DES3" => {
            legacy = true;
            ("3des", false)
        }
        "GCMAES256" => ("aes256gcm16", true),
        "GCMAES128" => ("aes128gcm16", true),
        "DES" => {
            return Err(unsupported(
                &n,
                "single DES is broken; xesp does not offer it",
            ));
        }
        _ => {
            return Err(unsupported(
                &n,
                "not an ikeEncryption (AES256 AES192 AES128 DES3 DES GCMAES256 GCMAES128)",
            ));
        }
    };
    let (n, ike_int) = enum_of(p, "ikeIntegrity")?;
    let hash = match ike_int.as_str() {
        "SHA384" => "sha384",
        "SHA256" => "sha256",
        "SHA1" => "sha1",
        "MD5" => return Err(unsupported(&n, "MD5 is broken; xesp does not offer it")),
        "GCMAES256" | "GCMAES128" => {
            return Err(unsupported(
                &n,
                "with it the PRF Azure uses is not documented; choose SHA256 or SHA384 \
                 (with GCM encryption they name the PRF)",
            ));
        }
        _ => {
            return Err(unsupported(
                &n,
                "not an ikeIntegrity (SHA384 SHA256 SHA1 MD5 GCMAES256 GCMAES128)",
            ));
        }
    };
    let (n, dh) = enum_of(p, "dhGroup")?;
    let dh_kw = match dh.as_str() {
        "DHGROUP24" => "modp2048s256",
        "ECP384" => "ecp384",
        "ECP256" => "ecp256",
        "DHGROUP14" | "DHGROUP2048" => "modp2048",
        "DHGROUP2" => {
            legacy = true;
            "modp1024"
        }
        "DHGROUP1" => {
            return Err(unsupported(
                &n,
                "768-bit MODP is broken; xesp does not offer it",
            ));
        }
        "NONE" => return Err(unsupported(&n, "an IKE_SA needs a Diffie-Hellman group")),
        _ => {
            return Err(unsupported(
                &n,
                "not a dhGroup (DHGroup24 ECP384 ECP256 DHGroup14 DHGroup2048 DHGroup2 DHGroup1 None)",
            ));
        }
    };
    let ike = if ike_gcm {
        format!("{ike_enc_kw}-prf{hash}-{dh_kw}")
    } else {
        format!("{ike_enc_kw}-{hash}-{dh_kw}")
    };

    let (n, esp_enc) = enum_of(p, "ipsecEncryption")?;
    let (esp_enc_kw, esp_gcm) = match esp_enc.as_str() {
        "GCMAES256" => ("aes256gcm16", Some("GCMAES256")),
        "GCMAES128" => ("aes128gcm16", Some("GCMAES128")),
        "AES256" => ("aes256", None),
        "AES192" => ("aes192", None),
        "AES128" => ("aes128", None),
        "DES3" => {
            legacy = true;
            ("3des", None)
        }
        "GCMAES192" => return Err(unsupported(&n, "xesp's AES-GCM takes 128- or 256-bit keys")),
        "DES" => {
            return Err(unsupported(
                &n,
                "single DES is broken; xesp does not offer it",
            ));
        }
        "NONE" => return Err(unsupported(&n, "xesp does not carry unencrypted ESP")),
        _ => {
            return Err(unsupported(
                &n,
                "not an ipsecEncryption (GCMAES256 GCMAES192 GCMAES128 AES256 AES192 AES128 DES3 DES None)",
            ));
        }
    };
    let (n, esp_int) = enum_of(p, "ipsecIntegrity")?;
    let esp_int_kw = match (esp_int.as_str(), esp_gcm) {
        (g, Some(enc)) if g == enc => None,
        (_, Some(enc)) => {
            return Err(unsupported(
                &n,
                &format!("with ipsecEncryption {enc}, ipsecIntegrity must be {enc} too"),
            ));
        }
        ("SHA256", None) => Some("sha256"),
        ("SHA1", None) => Some("sha1"),
        ("MD5", None) => return Err(unsupported(&n, "MD5 is broken; xesp does not offer it")),
        (g, None) if g.starts_with("GCMAES") => {
            return Err(unsupported(
                &n,
                "GCM integrity goes with GCM encryption only",
            ));
        }
        _ => {
            return Err(unsupported(
                &n,
                "not an ipsecIntegrity (GCMAES256 GCMAES192 GCMAES128 SHA256 SHA1 MD5)",
            ));
        }
    };
    let (n, pfs) = enum_of(p, "pfsGroup")?;
    let pfs_kw = match pfs.as_str() {
        "NONE" => None,
        "PFS24" => Some("modp2048s256"),
        "ECP384" => Some("ecp384"),
        "ECP256" => Some("ecp256"),
        "PFS2048" | "PFS14" => Some("modp2048"),
        "PFS2" => {
            legacy = true;
            Some("modp1024")
        }
        "PFS1" => {
            return Err(unsupported(
                &n,
                "768-bit MODP is broken; xesp does not offer it",
            ));
        }
        "PFSMM" => return Err(unsupported(&n, "PFSMM is not a group xesp knows")),
        _ => {
            return Err(unsupported(
                &n,
                "not a pfsGroup (PFS24 ECP384 ECP256 PFS2048 PFS14 PFS2 PFS1 PFSMM None)",
            ));
        }
    };
    let esp = [Some(esp_enc_kw), esp_int_kw, pfs_kw]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join("-");
    let life = p.req("saLifeTimeSeconds", "the CHILD_SA lifetime")?;
    let child_lifetime_secs = life.u64()?;
    if child_lifetime_secs < 10 {
        return Err(life.invalid("xesp needs 10 seconds or more (Azure: 300 to 172799)"));
    }
    let kb = p.req("saDataSizeKilobytes", "the CHILD_SA volume")?;
    let child_lifetime_kb = kb.u64()?;
    if child_lifetime_kb < SA_DATA_SIZE_KB.0 {
        return Err(kb.invalid("xesp needs 1024 KB or more (Azure: 1024 to 2147483647)"));
    }
    Ok(ImportedPolicy {
        ike,
        esp,
        child_lifetime_secs,
        child_lifetime_kb,
        legacy,
    })
}

/// Why a proposal cannot be an Azure policy, naming it.
fn cannot(field: &str, proposal: &str, reason: impl Into<String>) -> AzureError {
    AzureError::Inexpressible {
        field: field.into(),
        proposal: proposal.into(),
        reason: reason.into(),
    }
}

fn one<T: Copy>(v: &[T], what: &str, field: &str, shown: &str) -> Result<T, AzureError> {
    match v {
        [x] => Ok(*x),
        [] => Err(cannot(field, shown, format!("no {what}"))),
        _ => Err(cannot(
            field,
            shown,
            format!(
                "offers {} {what}s; an Azure policy takes exactly one (give the others in a later proposal)",
                v.len()
            ),
        )),
    }
}

fn aes(bits: AesKeyBits, gcm: bool) -> &'static str {
    match (bits, gcm) {
        (AesKeyBits::B128, false) => "AES128",
        (AesKeyBits::B192, false) => "AES192",
        (AesKeyBits::B256, false) => "AES256",
        (AesKeyBits::B128, true) => "GCMAES128",
        (AesKeyBits::B192, true) => "GCMAES192",
        (AesKeyBits::B256, true) => "GCMAES256",
    }
}

/// The IKE half of a policy: (ikeEncryption, ikeIntegrity, dhGroup).
pub fn export_ike(
    p: &IkeProposal,
    field: &str,
    shown: &str,
) -> Result<(&'static str, &'static str, &'static str), AzureError> {
    let encr = one(&p.encr, "encryption algorithm", field, shown)?;
    let prf = one(&p.prf, "PRF", field, shown)?;
    let dh = one(&p.dh, "Diffie-Hellman group", field, shown)?;
    let (enc, gcm) = match encr {
        Encr::AesCbc(b) => (aes(b, false), false),
        Encr::AesGcm16(b) => (aes(b, true), true),
        Encr::Des3Cbc => ("DES3", false),
    };
    let prf_name = match prf {
        Prf::HmacSha1 => "SHA1",
        Prf::HmacSha2_256 => "SHA256",
        Prf::HmacSha2_384 => "SHA384",
        Prf::HmacSha2_512 => {
            return Err(cannot(field, shown, "Azure has no SHA-512 for IKE"));
        }
    };
    let integ = if gcm {
        // With GCM, Azure's ikeIntegrity names the PRF.
        prf_name
    } else {
        let i = one(&p.integ, "integrity algorithm", field, shown)?;
        let name = match i {
            Integ::HmacSha1_96 => "SHA1",
            Integ::HmacSha2_256_128 => "SHA256",
            Integ::HmacSha2_384_192 => "SHA384",
            Integ::HmacSha2_512_256 => {
                return Err(cannot(field, shown, "Azure has no SHA-512 for IKE"));
            }
        };
        if name != prf_name {
            return Err(cannot(
                field,
                shown,
                "Azure's ikeIntegrity sets the integrity and the PRF alike; this proposal makes them differ",
            ));
        }
        name
    };
    let dh = match dh {
        DhGroup::Modp1024 => "DHGroup2",
        DhGroup::Modp2048 => "DHGroup14",
        DhGroup::Modp2048s256 => "DHGroup24",
        DhGroup::Ecp256 => "ECP256",
        DhGroup::Ecp384 => "ECP384",
        DhGroup::Curve25519 => {
            return Err(cannot(field, shown, "Azure has no Curve25519 (dhGroup)"));
        }
    };
    Ok((enc, integ, dh))
}

/// The ESP half of a policy: (ipsecEncryption, ipsecIntegrity, pfsGroup).
pub fn export_esp(
    p: &EspProposal,
    field: &str,
    shown: &str,
) -> Result<(&'static str, &'static str, &'static str), AzureError> {
    let encr = one(&p.encr, "encryption algorithm", field, shown)?;
    if !p.esn.contains(&false) {
        return Err(cannot(
            field,
            shown,
            "offers only extended sequence numbers; Azure's policies do not negotiate ESN",
        ));
    }
    let (enc, integ) = match encr {
        Encr::AesGcm16(b) => (aes(b, true), aes(b, true)),
        Encr::AesCbc(_) | Encr::Des3Cbc => {
            let enc = match encr {
                Encr::AesCbc(b) => aes(b, false),
                _ => "DES3",
            };
            let integ = match one(&p.integ, "integrity algorithm", field, shown)? {
                Integ::HmacSha1_96 => "SHA1",
                Integ::HmacSha2_256_128 => "SHA256",
                Integ::HmacSha2_384_192 | Integ::HmacSha2_512_256 => {
                    return Err(cannot(
                        field,
                        shown,
                        "Azure's ipsecIntegrity has SHA1 and SHA256 only",
                    ));
                }
            };
            (enc, integ)
        }
    };
    let pfs = match p.dh.as_slice() {
        [] => "None",
        [g] => match g {
            DhGroup::Modp1024 => "PFS2",
            DhGroup::Modp2048 => "PFS2048",
            DhGroup::Modp2048s256 => "PFS24",
            DhGroup::Ecp256 => "ECP256",
            DhGroup::Ecp384 => "ECP384",
            DhGroup::Curve25519 => {
                return Err(cannot(field, shown, "Azure has no Curve25519 (pfsGroup)"));
            }
        },
        more => {
            return Err(cannot(
                field,
                shown,
                format!(
                    "offers {} PFS groups; an Azure policy takes one",
                    more.len()
                ),
            ));
        }
    };
    Ok((enc, integ, pfs))
}

fn encr_kw(e: Encr) -> &'static str {
    match e {
        Encr::AesCbc(AesKeyBits::B128) => "aes128",
        Encr::AesCbc(AesKeyBits::B192) => "aes192",
        Encr::AesCbc(AesKeyBits::B256) => "aes256",
        Encr::AesGcm16(AesKeyBits::B128) => "aes128gcm16",
        Encr::AesGcm16(AesKeyBits::B192) => "aes192gcm16",
        Encr::AesGcm16(AesKeyBits::B256) => "aes256gcm16",
        Encr::Des3Cbc => "3des",
    }
}

fn integ_kw(i: Integ) -> &'static str {
    match i {
        Integ::HmacSha1_96 => "sha1",
        Integ::HmacSha2_256_128 => "sha256",
        Integ::HmacSha2_384_192 => "sha384",
        Integ::HmacSha2_512_256 => "sha512",
    }
}

fn prf_kw(p: Prf) -> &'static str {
    match p {
        Prf::HmacSha1 => "prfsha1",
        Prf::HmacSha2_256 => "prfsha256",
        Prf::HmacSha2_384 => "prfsha384",
        Prf::HmacSha2_512 => "prfsha512",
    }
}

fn dh_kw(g: DhGroup) -> &'static str {
    match g {
        DhGroup::Modp1024 => "modp1024",
        DhGroup::Modp2048 => "modp2048",
        DhGroup::Modp2048s256 => "modp2048s256",
        DhGroup::Ecp256 => "ecp256",
        DhGroup::Ecp384 => "ecp384",
        DhGroup::Curve25519 => "curve25519",
    }
}

fn implied_prf(i: Integ) -> Prf {
    match i {
        Integ::HmacSha1_96 => Prf::HmacSha1,
        Integ::HmacSha2_256_128 => Prf::HmacSha2_256,
        Integ::HmacSha2_384_192 => Prf::HmacSha2_384,
        Integ::HmacSha2_512_256 => Prf::HmacSha2_512,
    }
}

/// An IKE proposal in the notation of `xesp.toml` (the PRF named only when
/// the integrity algorithms do not imply it).
pub fn ike_string(p: &IkeProposal) -> String {
    let mut k: Vec<&str> = p.encr.iter().map(|e| encr_kw(*e)).collect();
    k.extend(p.integ.iter().map(|i| integ_kw(*i)));
    let implied: Vec<Prf> = p.integ.iter().map(|i| implied_prf(*i)).collect();
    if p.integ.is_empty() || p.prf != implied {
        k.extend(p.prf.iter().map(|x| prf_kw(*x)));
    }
    k.extend(p.dh.iter().map(|g| dh_kw(*g)));
    k.join("-")
}

/// An ESP proposal in the notation of `xesp.toml`.
pub fn esp_string(p: &EspProposal) -> String {
    let mut k: Vec<&str> = p.encr.iter().map(|e| encr_kw(*e)).collect();
    k.extend(p.integ.iter().map(|i| integ_kw(*i)));
    k.extend(p.dh.iter().map(|g| dh_kw(*g)));
    if p.esn != [false] {
        k.extend(p.esn.iter().map(|e| if *e { "esn" } else { "noesn" }));
    }
    k.join("-")
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn policy(ie: &str, ii: &str, dh: &str, pe: &str, pi: &str, pfs: &str) -> Value {
        json!({"saLifeTimeSeconds": 27000, "saDataSizeKilobytes": 102400000,
               "ikeEncryption": ie, "ikeIntegrity": ii, "dhGroup": dh,
               "ipsecEncryption": pe, "ipsecIntegrity": pi, "pfsGroup": pfs})
    }

    fn import(v: &Value) -> Result<ImportedPolicy, AzureError> {
        import_policy(&Node::root(v, "c.json"))
    }

    #[test]
    fn azure_policies_become_proposals() {
        let cases = [
            (
                (
                    "AES256",
                    "SHA256",
                    "DHGroup14",
                    "GCMAES256",
                    "GCMAES256",
                    "None",
                ),
                ("aes256-sha256-modp2048", "aes256gcm16", false),
            ),
            (
                (
                    "GCMAES256",
                    "SHA384",
                    "ECP384",
                    "GCMAES128",
                    "GCMAES128",
                    "ECP384",
                ),
                ("aes256gcm16-prfsha384-ecp384", "aes128gcm16-ecp384", false),
            ),
            (
                ("AES256", "SHA1", "DHGroup2", "AES256", "SHA1", "PFS2"),
                ("aes256-sha1-modp1024", "aes256-sha1-modp1024", true),
            ),
            (
                ("aes128", "sha256", "dhgroup24", "des3", "sha256", "pfs2048"),
                ("aes128-sha256-modp2048s256", "3des-sha256-modp2048", true),
            ),
        ];
        for ((ie, ii, dh, pe, pi, pfs), (ike, esp, legacy)) in cases {
            let p = import(&policy(ie, ii, dh, pe, pi, pfs)).unwrap();
            assert_eq!(
                (p.ike.as_str(), p.esp.as_str(), p.legacy),
                (ike, esp, legacy)
            );
            // They are proposals xesp reads.
            IkeProposal::parse(&p.ike).unwrap();
            EspProposal::parse(&p.esp).unwrap();
        }
    }

    #[test]
    fn what_xesp_cannot_do_is_named() {
        let cases = [
            (
                policy("DES", "SHA1", "DHGroup14", "AES256", "SHA1", "None"),
                "ikeEncryption",
            ),
            (
                policy("AES256", "MD5", "DHGroup14", "AES256", "SHA1", "None"),
                "ikeIntegrity",
            ),
            (
                policy("AES256", "SHA1", "DHGroup1", "AES256", "SHA1", "None"),
                "dhGroup",
            ),
            (
                policy("AES256", "SHA1", "None", "AES256", "SHA1", "None"),
                "dhGroup",
            ),
            (
                policy("AES256", "SHA1", "ECP256", "GCMAES192", "GCMAES192", "None"),
                "ipsecEncryption",
            ),
            (
                policy("AES256", "SHA1", "ECP256", "GCMAES256", "SHA256", "None"),
                "ipsecIntegrity",
            ),
            (
                policy("AES256", "SHA1", "ECP256", "AES256", "GCMAES256", "None"),
                "ipsecIntegrity",
            ),
            (
                policy("AES256", "SHA1", "ECP256", "AES256", "SHA1", "PFSMM"),
                "pfsGroup",
            ),
            (
                policy("AES512", "SHA1", "ECP256", "AES256", "SHA1", "None"),
                "ikeEncryption",
            ),
        ];
        for (v, field) in cases {
            let e = import(&v).unwrap_err().to_string();
            assert!(
                e.contains(field) && e.starts_with("c.json: "),
                "{field}: {e}"
            );
        }
        let mut v = policy("AES256", "SHA1", "ECP256", "AES256", "SHA1", "None");
        v["ikeEncrypton"] = json!("AES256");
        let e = import(&v).unwrap_err().to_string();
        assert!(
            e.contains("ikeEncrypton") && e.contains("ikeEncryption"),
            "{e}"
        );
        v.as_object_mut().unwrap().remove("ikeEncrypton");
        v.as_object_mut().unwrap().remove("pfsGroup");
        let e = import(&v).unwrap_err().to_string();
        assert!(e.contains("pfsGroup is missing"), "{e}");
        v["pfsGroup"] = json!("None");
        v["saDataSizeKilobytes"] = json!(0);
        let e = import(&v).unwrap_err().to_string();
        assert!(
            e.contains("saDataSizeKilobytes = 0") && e.contains("1024"),
            "{e}"
        );
    }

    #[test]
    fn proposals_become_azure_policies_and_back() {
        for (ike, esp) in [
            ("aes256-sha256-modp2048", "aes256gcm16"),
            ("aes256gcm16-prfsha384-ecp384", "aes128gcm16-ecp384"),
            ("aes128-sha1-modp1024", "aes256-sha1-modp2048s256"),
            ("aes192-sha384-ecp256", "3des-sha256"),
        ] {
            let i = IkeProposal::parse(ike).unwrap();
            let e = EspProposal::parse(esp).unwrap();
            let (ie, ii, dh) = export_ike(&i, "f", ike).unwrap();
            let (pe, pi, pfs) = export_esp(&e, "f", esp).unwrap();
            let back = import(&policy(ie, ii, dh, pe, pi, pfs)).unwrap();
            assert_eq!(IkeProposal::parse(&back.ike).unwrap(), i, "{ike}");
            assert_eq!(EspProposal::parse(&back.esp).unwrap(), e, "{esp}");
        }
    }

    #[test]
    fn proposals_azure_cannot_express_are_named() {
        for (ike, want) in [
            ("aes256-aes128-sha1-modp2048", "2 encryption algorithms"),
            ("aes256-sha512-modp2048", "SHA-512"),
            ("aes256-sha256-curve25519", "Curve25519"),
            ("aes256-sha256-prfsha384-modp2048", "differ"),
            ("aes256-sha256-modp2048-ecp256", "2 Diffie-Hellman groups"),
        ] {
            let p = IkeProposal::parse(ike).unwrap();
            let e = export_ike(&p, "tunnel[0].proposals[0]", &ike_string(&p))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("tunnel[0].proposals[0]") && e.contains(want),
                "{ike}: {e}"
            );
            assert!(e.contains(&ike_string(&p)), "{e}");
        }
        for (esp, want) in [
            ("aes256-sha384", "SHA1 and SHA256 only"),
            ("aes256gcm16-esn", "ESN"),
            ("aes256gcm16-curve25519", "Curve25519"),
        ] {
            let p = EspProposal::parse(esp).unwrap();
            let e = export_esp(&p, "x", esp).unwrap_err().to_string();
            assert!(e.contains(want), "{esp}: {e}");
        }
    }

    #[test]
    fn proposal_strings_read_back() {
        for s in [
            "aes256-sha256-modp2048",
            "aes256-sha256-prfsha384-modp2048",
            "aes256gcm16-prfsha384-ecp384",
        ] {
            let p = IkeProposal::parse(s).unwrap();
            assert_eq!(ike_string(&p), s);
        }
        for s in ["aes256gcm16", "aes256-sha1-modp2048-esn-noesn"] {
            let p = EspProposal::parse(s).unwrap();
            assert_eq!(esp_string(&p), s);
        }
    }
}
