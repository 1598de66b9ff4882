//! TCP MSS clamping for `datapath = "xfrm"` with nftables (the article's
//! `ip tcp adjust-mss 1350` on the tunnel interfaces).
//!
//! In the `tun` and `xdp` datapaths every tunnel packet passes through xesp,
//! which rewrites a SYN's MSS option itself ([`crate::mss`]). With kernel
//! ESP the packets never reach user space, so the kernel has to clamp.
//! Of its two ways, TC (a `pedit`/eBPF action on the xfrm interfaces) and
//! nftables, nftables is used:
//!
//! * its `tcp option maxseg size set` is the kernel's own TCP option rewrite,
//!   with the checksum fixed up incrementally; nothing per packet in user
//!   space, and no program of ours to verify or keep in step with kernels;
//! * it is what operators use and read: `nft list table inet xesp` shows the
//!   rules and their counters, in the form the distributions document;
//! * an xfrm interface has no TC fast path of its own to gain from, while
//!   nftables matches the inner packet by `iifname`/`oifname` before
//!   encryption (postrouting) and after decryption (prerouting).
//!
//! xesp owns exactly one table, `inet xesp`, never the host's others. It is
//! written by `nft -f -` (the tool nftables ships; the netlink encoding of
//! nf_tables expressions is libnftnl's, which has no maintained pure-Rust
//! equivalent that builds here), in one transaction that first removes any
//! table of that name (a previous run that crashed) and then defines it, so
//! a restart never doubles the rules. [`remove`] deletes it on stop.
//!
//! The rules clamp SYNs (and SYN-ACKs) whose MSS option (RFC 9293 §3.7.1;
//! RFC 6691 on what it counts) is larger than the clamp, in both
//! directions: arriving from a tunnel interface (prerouting) and leaving
//! through one (postrouting), at the mangle priority.

use std::{
    io::{self, Write},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

/// The table's family and name: `table inet xesp`.
pub const TABLE: &str = "inet xesp";
/// The smallest clamp accepted (RFC 9293 §3.7.1: the default MSS, 536).
pub const MIN_MSS: u16 = 536;
/// Where `nft` is looked for when it is not in `PATH` (daemons started
/// with a short `PATH`).
const NFT_FALLBACKS: &[&str] = &["/usr/sbin/nft", "/sbin/nft"];

/// What went wrong clamping the MSS with nftables.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    #[error(
        "tunnel interface name {0:?}: 1 to 15 letters, digits, '-', '_' or '.' (it goes into the nftables rules)"
    )]
    InterfaceName(String),
    #[error("mss_clamp {0}: below {MIN_MSS} octets")]
    Mss(u16),
    #[error("no tunnel interfaces to clamp the MSS on")]
    NoInterfaces,
    #[error(
        "nft is not installed (package nftables): the xfrm datapath clamps the TCP MSS (mss_clamp) with it"
    )]
    Missing,
    #[error("running {path}: {source}")]
    Run { path: PathBuf, source: io::Error },
    #[error("nft {action} table {TABLE} failed ({status}): {stderr}")]
    Failed {
        action: &'static str,
        status: ExitStatus,
        stderr: String,
    },
}

/// Checks an interface name before it goes into the rule text: what the
/// kernel takes as a name (at most 15 bytes) restricted to characters that
/// need no quoting in nftables' language.
fn check_name(name: &str) -> Result<&str, NftError> {
    let ok = !name.is_empty()
        && name.len() < libc::IFNAMSIZ
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(name)
    } else {
        Err(NftError::InterfaceName(name.to_owned()))
    }
}

/// The `nft -f` script that (re)defines `table inet xesp` with the clamp
/// of `mss` on `interfaces`, both directions.
pub fn ruleset<S: AsRef<str>>(interfaces: &[S], mss: u16) -> Result<String, NftError> {
    if interfaces.is_empty() {
        return Err(NftError::NoInterfaces);
    }
    if mss < MIN_MSS {
        return Err(NftError::Mss(mss));
    }
    let names = interfaces
        .iter()
        .map(|n| check_name(n.as_ref()).map(|n| format!("\"{n}\"")))
        .collect::<Result<Vec<_>, _>>()?
        .join(", ");
    let rule = |dir: &str| {
        format!(
            "{dir} {{ {names} }} tcp flags & syn == syn tcp option maxseg size > {mss} counter tcp option maxseg size set {mss}"
        )
    };
    Ok(format!(
        "# xesp's TCP MSS clamp (datapath = \"xfrm\"); replaced at each start\n\
         table {TABLE}\n\
         delete table {TABLE}\n\
         table {TABLE} {{\n\
         \tchain mss_clamp_in {{\n\
         \t\ttype filter hook prerouting priority mangle; policy accept;\n\
         \t\t{}\n\
         \t}}\n\
         \tchain mss_clamp_out {{\n\
         \t\ttype filter hook postrouting priority mangle; policy accept;\n\
         \t\t{}\n\
         \t}}\n\
         }}\n",
        rule("iifname"),
        rule("oifname"),
    ))
}

/// The script that deletes the table (when it exists: `table` first
/// creates it empty, so the delete cannot fail on a missing table).
fn removal() -> String {
    format!("table {TABLE}\ndelete table {TABLE}\n")
}

/// `nft`: from `PATH`, else from the sbin directories.
fn nft_path() -> Result<PathBuf, NftError> {
    let from_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nft"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    from_path
        .into_iter()
        .chain(NFT_FALLBACKS.iter().map(PathBuf::from))
        .find(|p| p.is_file())
        .ok_or(NftError::Missing)
}

/// Runs `nft -f -` with `script` on its standard input, in the calling
/// thread's network namespace.
fn run(nft: &Path, action: &'static str, script: &str) -> Result<(), NftError> {
    let err = |source: io::Error| {
        if source.kind() == io::ErrorKind::NotFound {
            NftError::Missing
        } else {
            NftError::Run {
                path: nft.to_owned(),
                source,
            }
        }
    };
    let mut child = Command::new(nft)
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(err)?;
    if let Some(mut stdin) = child.stdin.take() {
        // An nft that stops reading early (it refused the script) is
        // reported by its status and words below, not as a broken pipe.
        match stdin.write_all(script.as_bytes()) {
            Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(err(e)),
            _ => {}
        }
    }
    let out = child.wait_with_output().map_err(err)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NftError::Failed {
            action,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Installs (or replaces) the clamp of `mss` on `interfaces`.
pub fn install<S: AsRef<str>>(interfaces: &[S], mss: u16) -> Result<(), NftError> {
    let script = ruleset(interfaces, mss)?;
    run(&nft_path()?, "defining", &script)
}

/// Removes the table, if there is one.
pub fn remove() -> Result<(), NftError> {
    run(&nft_path()?, "deleting", &removal())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ruleset_replaces_the_table_and_clamps_both_directions() {
        let s = ruleset(&["Tunnel0", "Tunnel1"], 1350).unwrap();
        let lines: Vec<&str> = s.lines().map(str::trim).collect();
        // Replace: an empty table (created if missing), deleted, then defined.
        assert_eq!(
            lines[1..4],
            [
                "table inet xesp",
                "delete table inet xesp",
                "table inet xesp {"
            ]
        );
        let set = "{ \"Tunnel0\", \"Tunnel1\" }";
        let clamp = "tcp flags & syn == syn tcp option maxseg size > 1350 counter tcp option maxseg size set 1350";
        let chains = [
            ("mss_clamp_in", "prerouting", "iifname"),
            ("mss_clamp_out", "postrouting", "oifname"),
        ];
        for (chain, hook, dir) in chains {
            let at = lines
                .iter()
                .position(|l| *l == format!("chain {chain} {{"))
                .unwrap_or_else(|| panic!("no chain {chain} in\n{s}"));
            assert_eq!(
                lines[at + 1],
                format!("type filter hook {hook} priority mangle; policy accept;")
            );
            assert_eq!(lines[at + 2], format!("{dir} {set} {clamp}"));
            assert_eq!(lines[at + 3], "}");
        }
        assert_eq!(lines.iter().filter(|l| l.starts_with("chain")).count(), 2);
        assert_eq!(lines.last(), Some(&"}"));
    }

    #[test]
    fn one_interface_and_the_clamp_value_go_in_as_given() {
        let s = ruleset(&["t-1.x_2"], 536).unwrap();
        assert!(s.contains("iifname { \"t-1.x_2\" } tcp"), "{s}");
        assert!(
            s.contains("size > 536 counter tcp option maxseg size set 536\n"),
            "{s}"
        );
    }

    #[test]
    fn names_that_could_change_the_rules_are_refused() {
        for bad in [
            "",
            "Tunnel0\" } accept; {\"",
            "a b",
            "a;b",
            "a\nb",
            "x{",
            "sixteen_chars_xx",
            "é",
        ] {
            let e = ruleset(&["Tunnel0", bad], 1350).unwrap_err();
            assert!(
                matches!(&e, NftError::InterfaceName(n) if n == bad),
                "{bad:?}: {e}"
            );
            assert!(e.to_string().contains("tunnel interface name"), "{e}");
        }
        assert!(ruleset(&["fifteen_chars_x"], 1350).is_ok());
    }

    #[test]
    fn a_clamp_below_536_or_no_interface_is_refused() {
        assert!(matches!(
            ruleset(&["Tunnel0"], 535),
            Err(NftError::Mss(535))
        ));
        assert!(
            ruleset(&["Tunnel0"], 0)
                .unwrap_err()
                .to_string()
                .contains("mss_clamp 0")
        );
        assert!(matches!(
            ruleset::<&str>(&[], 1350),
            Err(NftError::NoInterfaces)
        ));
    }

    #[test]
    fn the_removal_cannot_fail_on_a_missing_table() {
        assert_eq!(removal(), "table inet xesp\ndelete table inet xesp\n");
    }

    #[test]
    fn a_missing_nft_is_named() {
        let e = run(Path::new("/nonexistent/nft"), "defining", "").unwrap_err();
        assert!(matches!(e, NftError::Missing), "{e}");
        assert!(
            e.to_string()
                .contains("nft is not installed (package nftables)")
        );
    }

    #[test]
    fn nft_refusing_the_script_is_reported_with_its_words() {
        // `false` stands in for an nft that rejects its input: its failure
        // comes back as Failed with the status.
        let f = which("false").expect("false(1) in /usr/bin or /bin");
        let e = run(&f, "defining", "table inet xesp\n").unwrap_err();
        match e {
            NftError::Failed { action, status, .. } => {
                assert_eq!(action, "defining");
                assert!(!status.success());
            }
            other => panic!("{other}"),
        }
    }

    fn which(tool: &str) -> Option<PathBuf> {
        ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.is_file())
    }
}
