//! `xesp-loadgen`: one end of `cargo xtask bench` (see `xesp_benches::serve`).

use std::{net::Ipv4Addr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use xesp_benches::{
    peer::PeerSettings,
    serve::{self, Sender, ServeSettings},
};

/// Traffic generator, sink and IKE peer of `cargo xtask bench`.
///
/// Run by the benchmark inside its network namespaces; it reads commands on
/// stdin (status, prepare TUNNELS SIZE COUNT, send, counters, raw SIZE N,
/// quit) and answers each with one JSON line.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Attach the XDP sink and serve commands until `quit`.
    Serve {
        /// Interface whose arriving traffic the sink counts.
        #[arg(long)]
        sink_if: String,
        /// LAN side: the address plaintext is sent from (and decrypted traffic goes to).
        #[arg(long, default_value = "10.0.0.10")]
        lan_host: Ipv4Addr,
        /// DMZ side: run the IKE peer with one tunnel per address given.
        #[arg(long, value_delimiter = ',')]
        peer: Vec<Ipv4Addr>,
        /// The device under test's public address.
        #[arg(long, default_value = "192.0.2.1")]
        dut: Ipv4Addr,
        /// File holding the pre-shared key.
        #[arg(long)]
        psk_file: Option<PathBuf>,
        /// IKE proposal the peer accepts (xesp.toml syntax).
        #[arg(long, default_value = "aes256-sha256-modp2048")]
        ike: String,
        /// ESP proposal the peer accepts.
        #[arg(long, default_value = "aes256gcm16")]
        esp: String,
        /// How the generator sends: afxdp (whole frames on an AF_XDP TX
        /// ring, bypassing this end's IP stack) or sendmmsg (UDP sockets).
        #[arg(long, default_value = "afxdp")]
        sender: Sender,
    },
}

fn main() -> ExitCode {
    let Cli { cmd } = Cli::parse();
    let Cmd::Serve {
        sink_if,
        lan_host,
        peer,
        dut,
        psk_file,
        ike,
        esp,
        sender,
    } = cmd;
    let peer = if peer.is_empty() {
        None
    } else {
        let Some(f) = psk_file else {
            eprintln!("xesp-loadgen: --peer needs --psk-file");
            return ExitCode::from(2);
        };
        let psk = match std::fs::read(&f) {
            Ok(p) => p.trim_ascii().to_vec(),
            Err(e) => {
                eprintln!("xesp-loadgen: reading {}: {e}", f.display());
                return ExitCode::from(2);
            }
        };
        Some(PeerSettings {
            locals: peer,
            dut,
            psk,
            ike_proposal: ike,
            esp_proposal: esp,
        })
    };
    match serve::run(ServeSettings {
        sink_if,
        peer,
        lan_host,
        sender,
    }) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xesp-loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
