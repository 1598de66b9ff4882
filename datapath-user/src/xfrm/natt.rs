//! ESP in UDP (RFC 3948) through the kernel: the IKE socket on port 4500
//! gets `UDP_ENCAP` = `UDP_ENCAP_ESPINUDP` (include/uapi/linux/udp.h); the
//! kernel then takes the ESP packets (non-zero SPI) arriving on it to XFRM,
//! and IKE messages (with the four zero octets of the non-ESP marker) still
//! reach the socket.

use std::{io, os::fd::AsRawFd};

use super::XfrmError;

/// `UDP_ENCAP` (include/uapi/linux/udp.h).
pub const UDP_ENCAP: libc::c_int = 100;
/// `UDP_ENCAP_ESPINUDP`: ESP in UDP as RFC 3948 has it.
pub const UDP_ENCAP_ESPINUDP: libc::c_int = 2;

/// Sets `UDP_ENCAP_ESPINUDP` on a UDP socket (IPv4 or IPv6).
pub fn set_espinudp(sock: &impl AsRawFd) -> Result<(), XfrmError> {
    let v: libc::c_int = UDP_ENCAP_ESPINUDP;
    // SAFETY: a valid descriptor, and a pointer to an int of the size given.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_UDP,
            UDP_ENCAP,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(XfrmError::Socket {
            what: "setsockopt(UDP_ENCAP, UDP_ENCAP_ESPINUDP)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// The socket's `UDP_ENCAP` setting (0: none).
pub fn espinudp(sock: &impl AsRawFd) -> Result<libc::c_int, XfrmError> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above, with the length the kernel may update.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_UDP,
            UDP_ENCAP,
            (&raw mut v).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(XfrmError::Socket {
            what: "getsockopt(UDP_ENCAP)",
            source: io::Error::last_os_error(),
        });
    }
    Ok(v)
}
