//! SA payloads (RFC 7296 §3.3): building our offers and choosing from the
//! peer's (§2.7), for the IKE_SA and for CHILD_SAs (ESP).

use core::fmt;

use xesp_esp::alg::{Encr, Integ, Suite};

use super::{
    codec::{Proposal, ProtocolId, Transform, TransformType},
    config::{EspProposal, IkeProposal},
    crypto::{DhGroup, Prf},
};

/// What an IKE_SA negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct IkeSuite {
    #[serde(serialize_with = "display")]
    pub encr: Encr,
    #[serde(serialize_with = "display_opt")]
    pub integ: Option<Integ>,
    pub prf: Prf,
    pub dh: DhGroup,
}

/// What a CHILD_SA negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ChildSuite {
    #[serde(serialize_with = "display")]
    pub encr: Encr,
    #[serde(serialize_with = "display_opt")]
    pub integ: Option<Integ>,
    /// The PFS group, if the exchange used one.
    pub dh: Option<DhGroup>,
    pub esn: bool,
}

fn display<S: serde::Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

fn display_opt<S: serde::Serializer, T: fmt::Display>(
    v: &Option<T>,
    s: S,
) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

impl IkeSuite {
    pub fn suite(&self) -> Suite {
        Suite {
            encr: self.encr,
            integ: self.integ,
        }
    }
    pub fn is_legacy(&self) -> bool {
        self.encr.is_legacy() || self.dh.is_legacy()
    }
}

impl ChildSuite {
    pub fn suite(&self) -> Suite {
        Suite {
            encr: self.encr,
            integ: self.integ,
        }
    }
    pub fn is_legacy(&self) -> bool {
        self.encr.is_legacy() || self.dh.is_some_and(DhGroup::is_legacy)
    }
}

impl fmt::Display for IkeSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.integ {
            Some(i) => write!(f, "{}/{}/{}/{}", self.encr, i, self.prf, self.dh),
            None => write!(f, "{}/{}/{}", self.encr, self.prf, self.dh),
        }
    }
}

impl fmt::Display for ChildSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.suite())?;
        if let Some(g) = self.dh {
            write!(f, "/{g}")?;
        }
        if self.esn {
            f.write_str("/ESN")?;
        }
        Ok(())
    }
}

const ESN_ID: [u16; 2] = [0, 1];

fn encr_t(e: Encr) -> Transform {
    Transform::new(TransformType::ENCR, e.transform_id(), e.key_length_attr())
}

/// Our IKE_SA offer. `spi` is set for IKE_SA rekeying (§3.3.1: 8 octets).
pub fn ike_offer(ours: &[IkeProposal], allow_legacy: bool, spi: Option<u64>) -> Vec<Proposal> {
    let mut out = Vec::new();
    for p in ours {
        let encr: Vec<_> = p
            .encr
            .iter()
            .filter(|e| allow_legacy || !e.is_legacy())
            .collect();
        let dh: Vec<_> =
            p.dh.iter()
                .filter(|g| allow_legacy || !g.is_legacy())
                .collect();
        if encr.is_empty() || dh.is_empty() {
            continue;
        }
        let mut t: Vec<Transform> = encr.into_iter().map(|e| encr_t(*e)).collect();
        t.extend(
            p.prf
                .iter()
                .map(|f| Transform::new(TransformType::PRF, f.transform_id(), None)),
        );
        t.extend(
            p.integ
                .iter()
                .map(|i| Transform::new(TransformType::INTEG, i.transform_id(), None)),
        );
        t.extend(
            dh.into_iter()
                .map(|g| Transform::new(TransformType::DH, g.id(), None)),
        );
        out.push(Proposal {
            number: (out.len() + 1) as u8,
            protocol: ProtocolId::IKE,
            spi: spi.map(|s| s.to_be_bytes().to_vec()).unwrap_or_default(),
            transforms: t,
            reserved: 0,
        });
    }
    out
}

/// Our ESP offer with inbound `spi`; DH transforms only with `pfs` (never in IKE_AUTH).
pub fn esp_offer(ours: &[EspProposal], allow_legacy: bool, spi: u32, pfs: bool) -> Vec<Proposal> {
    let mut out = Vec::new();
    for p in ours {
        let encr: Vec<_> = p
            .encr
            .iter()
            .filter(|e| allow_legacy || !e.is_legacy())
            .collect();
        if encr.is_empty() {
            continue;
        }
        let mut t: Vec<Transform> = encr.into_iter().map(|e| encr_t(*e)).collect();
        t.extend(
            p.integ
                .iter()
                .map(|i| Transform::new(TransformType::INTEG, i.transform_id(), None)),
        );
        if pfs {
            t.extend(
                p.dh.iter()
                    .filter(|g| allow_legacy || !g.is_legacy())
                    .map(|g| Transform::new(TransformType::DH, g.id(), None)),
            );
        }
        t.extend(
            p.esn
                .iter()
                .map(|e| Transform::new(TransformType::ESN, ESN_ID[usize::from(*e)], None)),
        );
        out.push(Proposal {
            number: (out.len() + 1) as u8,
            protocol: ProtocolId::ESP,
            spi: spi.to_be_bytes().to_vec(),
            transforms: t,
            reserved: 0,
        });
    }
    out
}

/// The transforms of a received proposal, by type, in the peer's order;
/// values we do not know are left out (they cannot be chosen).
#[derive(Default)]
struct Offered {
    encr: Vec<Encr>,
    integ: Vec<Integ>,
    prf: Vec<Prf>,
    dh: Vec<Option<DhGroup>>,
    esn: Vec<bool>,
}

fn offered(p: &Proposal) -> Offered {
    let mut o = Offered::default();
    for t in &p.transforms {
        match t.kind {
            TransformType::ENCR => o.encr.extend(Encr::from_ike(t.id, t.key_length())),
            TransformType::INTEG => o.integ.extend(Integ::from_ike(t.id)),
            TransformType::PRF => o.prf.extend(Prf::from_ike(t.id)),
            TransformType::DH if t.id == 0 => o.dh.push(None),
            TransformType::DH => o.dh.extend(DhGroup::from_ike(t.id).map(Some)),
            TransformType::ESN if t.id <= 1 => o.esn.push(t.id == 1),
            _ => {}
        }
    }
    o
}

fn first_common<T: PartialEq + Copy>(peer: &[T], ours: &[T], ok: impl Fn(&T) -> bool) -> Option<T> {
    peer.iter().find(|t| ours.contains(t) && ok(t)).copied()
}

/// Responder: the first of the peer's IKE proposals we accept (§2.7).
/// Returns what was chosen and the single-transform proposal to answer with.
pub fn choose_ike(
    ours: &[IkeProposal],
    peer: &[Proposal],
    allow_legacy: bool,
    spi: Option<u64>,
) -> Option<(IkeSuite, Proposal)> {
    let legacy_ok = |l: bool| allow_legacy || !l;
    for p in peer.iter().filter(|p| p.protocol == ProtocolId::IKE) {
        let o = offered(p);
        for mine in ours {
            let Some(encr) = first_common(&o.encr, &mine.encr, |e| legacy_ok(e.is_legacy())) else {
                continue;
            };
            let integ = if encr.is_aead() {
                if !o.integ.is_empty() {
                    continue;
                }
                None
            } else {
                match first_common(&o.integ, &mine.integ, |_| true) {
                    Some(i) => Some(i),
                    None => continue,
                }
            };
            let Some(prf) = first_common(&o.prf, &mine.prf, |_| true) else {
                continue;
            };
            let dh_ours: Vec<Option<DhGroup>> = mine.dh.iter().map(|g| Some(*g)).collect();
            let Some(Some(dh)) = first_common(&o.dh, &dh_ours, |g| {
                legacy_ok(g.is_some_and(DhGroup::is_legacy))
            }) else {
                continue;
            };
            let suite = IkeSuite {
                encr,
                integ,
                prf,
                dh,
            };
            let mut t = vec![
                encr_t(encr),
                Transform::new(TransformType::PRF, prf.transform_id(), None),
            ];
            t.extend(integ.map(|i| Transform::new(TransformType::INTEG, i.transform_id(), None)));
            t.push(Transform::new(TransformType::DH, dh.id(), None));
            let answer = Proposal {
                number: p.number,
                protocol: ProtocolId::IKE,
                spi: spi.map(|s| s.to_be_bytes().to_vec()).unwrap_or_default(),
                transforms: t,
                reserved: 0,
            };
            return Some((suite, answer));
        }
    }
    None
}

/// Responder: the first of the peer's ESP proposals we accept. With `pfs`
/// the exchange carries KE: a common DH group is needed; without it, DH
/// transforms are ignored (IKE_AUTH, §1.2) unless the peer insists on one.
/// Returns the suite, the peer's SPI and the proposal to answer with (our `spi`).
pub fn choose_esp(
    ours: &[EspProposal],
    peer: &[Proposal],
    allow_legacy: bool,
    spi: u32,
    ke_group: Option<DhGroup>,
) -> Option<(ChildSuite, u32, Proposal)> {
    let legacy_ok = |l: bool| allow_legacy || !l;
    for p in peer.iter().filter(|p| p.protocol == ProtocolId::ESP) {
        let Ok(peer_spi) = <[u8; 4]>::try_from(p.spi.as_slice()).map(u32::from_be_bytes) else {
            continue;
        };
        let o = offered(p);
        for mine in ours {
            let Some(encr) = first_common(&o.encr, &mine.encr, |e| legacy_ok(e.is_legacy())) else {
                continue;
            };
            let integ = if encr.is_aead() {
                None
            } else {
                match first_common(&o.integ, &mine.integ, |_| true) {
                    Some(i) => Some(i),
                    None => continue,
                }
            };
            let esn_peer = if o.esn.is_empty() {
                vec![false]
            } else {
                o.esn.clone()
            };
            let Some(esn) = first_common(&esn_peer, &mine.esn, |_| true) else {
                continue;
            };
            let dh = match ke_group {
                // The KE payload's group must be one both offered.
                Some(g) => {
                    if !o.dh.contains(&Some(g))
                        || !mine.dh.contains(&g)
                        || !legacy_ok(g.is_legacy())
                    {
                        continue;
                    }
                    Some(g)
                }
                None => None,
            };
            let suite = ChildSuite {
                encr,
                integ,
                dh,
                esn,
            };
            let mut t = vec![encr_t(encr)];
            t.extend(integ.map(|i| Transform::new(TransformType::INTEG, i.transform_id(), None)));
            t.extend(dh.map(|g| Transform::new(TransformType::DH, g.id(), None)));
            t.push(Transform::new(
                TransformType::ESN,
                ESN_ID[usize::from(esn)],
                None,
            ));
            let answer = Proposal {
                number: p.number,
                protocol: ProtocolId::ESP,
                spi: spi.to_be_bytes().to_vec(),
                transforms: t,
                reserved: 0,
            };
            return Some((suite, peer_spi, answer));
        }
    }
    None
}

/// The groups the peer's ESP proposals offer for PFS (to pick a KE group).
pub fn esp_dh_groups(peer: &[Proposal]) -> Vec<DhGroup> {
    peer.iter()
        .flat_map(|p| offered(p).dh.into_iter().flatten())
        .collect()
}

/// Initiator: checks that the responder chose exactly one of each transform
/// from what we offered (§2.7), and says what it is.
pub fn accepted_ike(
    ours: &[IkeProposal],
    answer: &[Proposal],
    allow_legacy: bool,
) -> Option<IkeSuite> {
    let [p] = answer else { return None };
    let (suite, _) = choose_ike(ours, answer, allow_legacy, None)?;
    let count = |k| p.transforms.iter().filter(|t| t.kind == k).count();
    let one_each = count(TransformType::ENCR) == 1
        && count(TransformType::PRF) == 1
        && count(TransformType::DH) == 1
        && count(TransformType::INTEG) == usize::from(suite.integ.is_some());
    one_each.then_some(suite)
}

/// Initiator: the responder's single ESP proposal, checked against our
/// offer; returns the suite and the responder's SPI.
/// The peer's proposals that do without a Diffie-Hellman exchange (none
/// offered, or NONE among them): what a responder without PFS may choose
/// when the request carries a KE payload anyway (RFC 7296 §1.3.1: KEr only
/// if the selected suite includes that group).
pub fn without_pfs(peer: &[Proposal]) -> Vec<Proposal> {
    peer.iter()
        .filter(|p| {
            let dh = offered(p).dh;
            dh.is_empty() || dh.contains(&None)
        })
        .cloned()
        .collect()
}

pub fn accepted_esp(
    ours: &[EspProposal],
    answer: &[Proposal],
    allow_legacy: bool,
    ke_group: Option<DhGroup>,
) -> Option<(ChildSuite, u32)> {
    let [p] = answer else { return None };
    let (suite, spi, _) = choose_esp(ours, answer, allow_legacy, 0, ke_group)?;
    let count = |k| p.transforms.iter().filter(|t| t.kind == k).count();
    let one_each = count(TransformType::ENCR) == 1
        && count(TransformType::INTEG) == usize::from(suite.integ.is_some());
    one_each.then_some((suite, spi))
}

#[cfg(test)]
mod tests {
    use super::*;
    use xesp_esp::alg::AesKeyBits;

    fn ike(s: &str) -> IkeProposal {
        IkeProposal::parse(s).unwrap()
    }
    fn esp(s: &str) -> EspProposal {
        EspProposal::parse(s).unwrap()
    }

    #[test]
    fn responder_picks_the_first_acceptable_in_the_peers_order() {
        let offer = ike_offer(
            &[ike("aes128-sha1-modp2048"), ike("aes256-sha256-modp2048")],
            false,
            None,
        );
        let (suite, answer) = choose_ike(
            &[ike("aes256-sha256-modp2048"), ike("aes128-sha1-modp2048")],
            &offer,
            false,
            None,
        )
        .unwrap();
        assert_eq!(
            suite.encr,
            Encr::AesCbc(AesKeyBits::B128),
            "the peer's first proposal wins"
        );
        assert_eq!(answer.number, 1);
        assert_eq!(
            accepted_ike(
                &[ike("aes128-sha1-modp2048")],
                std::slice::from_ref(&answer),
                false
            ),
            Some(suite)
        );
        // The initiator refuses an answer it did not offer, or with two of a kind.
        assert_eq!(
            accepted_ike(
                &[ike("aes256-sha256-modp2048")],
                std::slice::from_ref(&answer),
                false
            ),
            None
        );
        let mut two = answer;
        two.transforms
            .push(Transform::new(TransformType::DH, 19, None));
        assert_eq!(
            accepted_ike(&[ike("aes128-sha1-modp2048")], &[two], false),
            None
        );
    }

    #[test]
    fn legacy_only_when_allowed() {
        let cisco = [ike("aes256-sha1-modp1024")];
        assert!(
            ike_offer(&cisco, false, None).is_empty(),
            "group 2 is not even offered"
        );
        let offer = ike_offer(&cisco, true, None);
        assert!(choose_ike(&cisco, &offer, false, None).is_none());
        let (suite, _) = choose_ike(&cisco, &offer, true, None).unwrap();
        assert!(suite.is_legacy());
        assert_eq!(suite.dh, DhGroup::Modp1024);
    }

    #[test]
    fn esp_selection_with_and_without_pfs() {
        let ours = [esp("aes256gcm16-modp2048"), esp("aes256-sha1")];
        let offer = esp_offer(&ours, false, 0xc0ffee01, true);
        let (s, peer_spi, answer) =
            choose_esp(&ours, &offer, false, 0x1000, Some(DhGroup::Modp2048)).unwrap();
        assert_eq!(
            (s.dh, peer_spi, s.esn),
            (Some(DhGroup::Modp2048), 0xc0ffee01, false)
        );
        assert_eq!(
            accepted_esp(&ours, &[answer], false, Some(DhGroup::Modp2048)),
            Some((s, 0x1000))
        );
        // In IKE_AUTH the DH transforms are ignored.
        let (s, _, _) = choose_esp(&ours, &offer, false, 0x1000, None).unwrap();
        assert_eq!(s.dh, None);
        // A group nobody offered fails.
        assert!(choose_esp(&ours, &offer, false, 1, Some(DhGroup::Ecp384)).is_none());
        let cbc = esp_offer(&[esp("aes256-sha1")], false, 7, false);
        let (s, _, _) = choose_esp(&ours, &cbc, false, 1, None).unwrap();
        assert_eq!(s.integ, Some(Integ::HmacSha1_96));
        assert!(choose_esp(&[esp("aes128gcm16")], &cbc, false, 1, None).is_none());
    }
}
