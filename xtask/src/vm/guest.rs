//! Helpers that run inside the guest, called from test binaries the guest
//! runs (the host's cargo-built binaries run there unchanged).

use std::{
    fs,
    net::{Ipv4Addr, UdpSocket},
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

/// `UDP_ENCAP` socket option (linux/udp.h).
const UDP_ENCAP: libc::c_int = 100;
/// `UDP_ENCAP_ESPINUDP` (RFC 3948 ESP in UDP).
const UDP_ENCAP_ESPINUDP: libc::c_int = 2;

/// Holds a UDP socket on `port` marked `UDP_ENCAP_ESPINUDP`, which the kernel
/// needs to decapsulate ESP in UDP arriving on that port (an IKE daemon holds
/// it in real life). Writes `ready` once the socket is set up, then keeps it
/// until `stop` exists or `max` has passed.
pub fn hold_udp_encap(port: u16, ready: &Path, stop: &Path, max: Duration) -> Result<()> {
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))
        .with_context(|| format!("binding UDP port {port}"))?;
    let one: libc::c_int = UDP_ENCAP_ESPINUDP;
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_UDP,
            UDP_ENCAP,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        bail!(
            "setsockopt(UDP_ENCAP, UDP_ENCAP_ESPINUDP) on port {port}: {}",
            std::io::Error::last_os_error()
        );
    }
    fs::write(ready, format!("{}\n", std::process::id()))
        .with_context(|| format!("writing {}", ready.display()))?;
    let until = Instant::now() + max;
    while Instant::now() < until && !stop.exists() {
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(sock);
    Ok(())
}
