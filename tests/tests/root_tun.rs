//! Needs root: TUN devices carry the host's own packets both ways, and their
//! carrier state is what the kernel sees.

#![allow(clippy::unwrap_used)] // a test: a failed step is a failed test

use std::time::{Duration, Instant};

use datapath_user::tun::Tun;
use xtask::netns::Netns;

/// Turns an IPv4 ICMP echo request into the matching reply, in place.
fn echo_reply(p: &mut [u8]) {
    let (src, dst) = ([p[12], p[13], p[14], p[15]], [p[16], p[17], p[18], p[19]]);
    p[12..16].copy_from_slice(&dst);
    p[16..20].copy_from_slice(&src);
    let ihl = usize::from(p[0] & 0xf) * 4;
    assert_eq!(p[ihl], 8, "expected an echo request");
    p[ihl] = 0;
    // Type 8 -> 0 in the high byte of the first ICMP word: checksum += 0x0800.
    let sum = u16::from_be_bytes([p[ihl + 2], p[ihl + 3]]);
    let fixed = datapath_user::mss::checksum_replace(sum, 0x0800, 0x0000);
    p[ihl + 2..ihl + 4].copy_from_slice(&fixed.to_be_bytes());
}

#[test]
fn root_tun_answers_a_ping_and_follows_its_carrier() {
    let ns = Netns::create("tun").unwrap();
    let tun = ns.enter(|| Tun::create("tun0")).unwrap().unwrap();
    ns.ip(&["addr", "add", "172.16.0.1/32", "dev", "tun0"])
        .unwrap();
    ns.ip(&["link", "set", "tun0", "up"]).unwrap();
    ns.ip(&["route", "add", "10.9.9.9/32", "dev", "tun0"])
        .unwrap();

    let mut ping = ns.cmd("ping");
    ping.args(["-c", "1", "-W", "5", "10.9.9.9"]);
    let child = ping.stdout(std::process::Stdio::null()).spawn().unwrap();
    let mut buf = [0u8; 2048];
    let deadline = Instant::now() + Duration::from_secs(5);
    let n = loop {
        match tun.recv(&mut buf) {
            Ok(n) if buf[0] >> 4 == 4 && buf[9] == 1 => break n,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("no echo request on tun0: {e}"),
        }
    };
    assert_eq!(
        &buf[12..16],
        &[172, 16, 0, 1],
        "source is the tunnel address"
    );
    echo_reply(&mut buf[..n]);
    tun.send(&buf[..n]).unwrap();
    assert!(
        child.wait_with_output().unwrap().status.success(),
        "ping got no reply through tun0"
    );

    tun.set_carrier(false).unwrap();
    let link = ns.exec("ip", &["link", "show", "tun0"]).unwrap();
    assert!(link.contains("NO-CARRIER"), "{link}");
    tun.set_carrier(true).unwrap();
    let link = ns.exec("ip", &["link", "show", "tun0"]).unwrap();
    assert!(!link.contains("NO-CARRIER"), "{link}");
}
