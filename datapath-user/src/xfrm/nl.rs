//! A small synchronous netlink client, shared by the XFRM socket
//! (`NETLINK_XFRM`) and the xfrm interfaces' rtnetlink requests: one request,
//! its answers until the acknowledgement or the end of a dump.
//!
//! Requests that carry keys are serialized into a buffer that is zeroed when
//! dropped, and the socket asks for capped acknowledgements
//! (`NETLINK_CAP_ACK`, netlink(7)) so that an error does not echo a request's
//! keys back. Received bytes are zeroed once parsed: a GETSA answer carries
//! the SA's keys.

use std::io;

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_ACK_TLVS, NLM_F_CAPPED, NLM_F_DUMP_INTR, NLM_F_REQUEST, NetlinkBuffer,
    NetlinkDeserializable, NetlinkHeader, NetlinkMessage, NetlinkPayload, NetlinkSerializable,
    NlasIterator,
};
use netlink_sys::{Socket, SocketAddr};
use zeroize::{Zeroize, Zeroizing};

use super::XfrmError;

/// `NLMSGERR_ATTR_MSG` (include/uapi/linux/netlink.h): the extended ACK's
/// error string.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// One netlink socket, connected to the kernel.
pub(crate) struct NlSocket {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl NlSocket {
    /// Opens a socket of `protocol` in the calling thread's network namespace.
    pub(crate) fn open(protocol: isize, what: &'static str) -> Result<Self, XfrmError> {
        let io = |source| XfrmError::Socket { what, source };
        let mut sock = Socket::new(protocol).map_err(io)?;
        sock.bind_auto().map_err(io)?;
        sock.connect(&SocketAddr::new(0, 0)).map_err(io)?;
        // Best effort: older kernels answer as before without them.
        let _ = sock.set_cap_ack(true);
        let _ = sock.set_ext_ack(true);
        Ok(Self {
            sock,
            seq: 0,
            // A dump's datagram holds several SAs of up to ~1 KiB each.
            buf: vec![0; 65536],
        })
    }

    /// Sends `msg` with `flags` (plus `NLM_F_REQUEST`) and collects the
    /// answering messages of type `R` until the kernel's ACK (when
    /// `NLM_F_ACK` is in `flags`), the end of a dump (`NLM_F_DUMP`), or the
    /// one answer of a plain get.
    pub(crate) fn transact<S, R>(
        &mut self,
        request: &str,
        msg: S,
        flags: u16,
    ) -> Result<Vec<R>, XfrmError>
    where
        S: NetlinkSerializable,
        R: NetlinkDeserializable,
        R::Error: std::fmt::Display,
    {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = self.seq;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        req.finalize();
        let mut out = Zeroizing::new(vec![0u8; req.header.length as usize]);
        req.serialize(&mut out);
        drop(req);
        self.sock
            .send(&out, 0)
            .map_err(|source| XfrmError::Socket {
                what: "netlink send",
                source,
            })?;
        let dump = flags & netlink_packet_core::NLM_F_DUMP == netlink_packet_core::NLM_F_DUMP;
        let wants_ack = flags & NLM_F_ACK != 0;
        let mut answers = Vec::new();
        loop {
            let n = match self.sock.recv(&mut &mut self.buf[..], 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(XfrmError::Socket {
                        what: "netlink receive",
                        source,
                    });
                }
            };
            let n = n.min(self.buf.len());
            let done = parse_datagram(&self.buf[..n], self.seq, request, &mut answers);
            self.buf[..n].zeroize();
            match done? {
                Step::More => {}
                Step::Done => return Ok(answers),
                Step::Answer if !dump && !wants_ack => return Ok(answers),
                Step::Answer => {}
            }
        }
    }
}

enum Step {
    More,
    Answer,
    Done,
}

/// Walks one datagram's messages; those of sequence `seq` are ours.
fn parse_datagram<R>(
    mut bytes: &[u8],
    seq: u32,
    request: &str,
    answers: &mut Vec<R>,
) -> Result<Step, XfrmError>
where
    R: NetlinkDeserializable,
    R::Error: std::fmt::Display,
{
    let mut step = Step::More;
    while !bytes.is_empty() {
        let nb = NetlinkBuffer::new_checked(bytes).map_err(|e| XfrmError::Decode {
            request: request.to_owned(),
            detail: e.to_string(),
        })?;
        let len = nb.length() as usize;
        if len < 16 || len > bytes.len() {
            return Err(XfrmError::Decode {
                request: request.to_owned(),
                detail: format!("netlink message length {len} in {} octets", bytes.len()),
            });
        }
        // Messages are 4-octet aligned within a datagram.
        let next = len.next_multiple_of(4).min(bytes.len());
        let this = &bytes[..len];
        bytes = &bytes[next..];
        if nb.sequence_number() != seq {
            continue;
        }
        if nb.flags() & NLM_F_DUMP_INTR != 0 {
            return Err(XfrmError::DumpInterrupted(request.to_owned()));
        }
        let flags = nb.flags();
        let msg = NetlinkMessage::<R>::deserialize(this).map_err(|e| XfrmError::Decode {
            request: request.to_owned(),
            detail: e.to_string(),
        })?;
        match msg.payload {
            NetlinkPayload::InnerMessage(m) => {
                answers.push(m);
                step = Step::Answer;
            }
            NetlinkPayload::Error(e) => {
                let Some(code) = e.code else {
                    return Ok(Step::Done);
                };
                return Err(XfrmError::Kernel {
                    request: request.to_owned(),
                    errno: -code.get(),
                    message: ext_ack_message(&e.header, flags),
                });
            }
            NetlinkPayload::Done(_) => return Ok(Step::Done),
            _ => {}
        }
    }
    Ok(step)
}

/// The kernel's explanation of an error (the extended ACK's message), if
/// it sent one. `payload` is the NLMSG_ERROR's payload after the errno: the
/// original header (and the request, unless capped), then attributes.
fn ext_ack_message(payload: &[u8], flags: u16) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 {
        return None;
    }
    let skip = if flags & NLM_F_CAPPED != 0 {
        16
    } else {
        let len = payload.get(..4)?;
        (u32::from_ne_bytes([len[0], len[1], len[2], len[3]]) as usize).next_multiple_of(4)
    };
    let tlvs = payload.get(skip..)?;
    for nla in NlasIterator::new(tlvs) {
        let nla = nla.ok()?;
        if nla.kind() == NLMSGERR_ATTR_MSG {
            let v = nla.value();
            let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
            return Some(String::from_utf8_lossy(&v[..end]).into_owned());
        }
    }
    None
}
