//! `cargo xtask bench`: whole devices measured side by side in one run.
//!
//! Three namespaces (see [`dut`]): a LAN end and a DMZ end, both
//! `xesp-loadgen serve` (generator, XDP sink, and on the DMZ side the IKE
//! peer that knows every key), with the device under test between them,
//! one after the other with the same packets: xesp's release build (XDP +
//! AF_XDP workers); the null forwarder (the same build with the ESP work
//! replaced by adding and removing as many octets, see
//! datapath-user/src/null.rs), the ceiling of this machine's AF_XDP path;
//! the kernel forwarding the inner packets (no IPsec, no XDP), the stack's
//! ceiling; and strongSwan 5.9.8 with kernel-libipsec.
//!
//! The repetitions go round the devices: in each round every device is
//! started in turn and measured once in each of its cases, so that what
//! drifts during a run falls on all of them alike. xesp and the null
//! forwarder are then measured, in a session of their own, flat out again
//! and with offered load paced at 50% to 200% of that flat-out median (one
//! tunnel, each step repeated as the flat-out trials): overload must be
//! shed without the delivered rate falling.
//! Logs and configurations go to `round<n>/` and `overload/` in the report
//! folder.
//!
//! Each trial sends a fixed number of pre-built packets as fast as the
//! generator can (whole frames on an AF_XDP TX ring, or with `--sender
//! sendmmsg` batched `sendmmsg` on UDP sockets; one thread per tunnel on
//! its own CPU)
//! and counts at the sink what arrives intact until nothing more does:
//! delivered packets per second over that time, Gbit/s of inner packets,
//! loss, and the device's CPU time per delivered packet (its threads'
//! schedstat; kernel work done in softirq on the sending CPU is not in it).

mod chart;
mod diag;
mod dut;
mod ends;
mod report;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use serde::Serialize;

use self::{
    dut::{DUT_PUBLIC, Dut, DutKind, LAN_HOST, PEERS, Topology},
    ends::{End, cpu_ns, user_ns},
    report::Trial,
};
use crate::setup;

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "xesp's AF_XDP workers run off the CPU that feeds their queue: \
queue q's on CPU q+1, since tunnel q's generator and the receive softirq that fills \
queue q run on CPU q. XESP_AF_XDP_CPUS in this command's environment chooses \
instead (a comma-separated list, queue 0's first; empty: unpinned)."
)]
pub struct BenchArgs {
    /// A short run (a few minutes once built): fewer packets, one repetition.
    #[arg(long)]
    pub quick: bool,
    /// Packets per trial [default: 300000, or 60000 with --quick].
    #[arg(long)]
    pub packets: Option<u64>,
    /// Repetitions of each trial; min / median / max reported [default: 3, or 1 with --quick].
    #[arg(long)]
    pub repeat: Option<u32>,
    /// Report folder [default: target/bench/<UTC time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Devices to measure, comma-separated: xesp, null, kernel, strongswan,
    /// and xesp-bp, null-bp (xesp and the null forwarder with busy polling,
    /// see --busy-poll) [default: xesp, null, kernel, strongswan].
    #[arg(long, value_delimiter = ',')]
    pub devices: Vec<String>,
    /// Only the cases whose name contains this (names look like
    /// gcm256/decrypt/1400/1t).
    #[arg(long)]
    pub filter: Option<String>,
    /// Skip the overload steps (50% to 200% of the peak offered).
    #[arg(long)]
    pub no_overload: bool,
    /// Busy polling of xesp-bp and null-bp's AF_XDP sockets:
    /// <microseconds>[/<budget>] (SO_BUSY_POLL, SO_BUSY_POLL_BUDGET, with
    /// SO_PREFER_BUSY_POLL); xesp and null run without.
    #[arg(long, default_value = "50/64")]
    pub busy_poll: String,
    /// How the generator sends: afxdp (pre-built frames on an AF_XDP TX
    /// ring per tunnel, bypassing the sending end's IP stack) or sendmmsg
    /// (batched sendmmsg on UDP sockets, the stack builds the headers).
    #[arg(long, default_value = "afxdp", value_parser = ["afxdp", "sendmmsg"])]
    pub sender: String,
}

/// Offered load of the overload steps, in percent of the measured peak.
pub const OVERLOAD_STEPS: [u32; 4] = [50, 100, 150, 200];

/// The ESP transforms measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Suite {
    #[serde(rename = "aes-gcm-256")]
    Gcm256,
    #[serde(rename = "aes-cbc-256/hmac-sha1-96")]
    Cbc256Sha1,
}

impl Suite {
    pub const ALL: [Suite; 2] = [Suite::Gcm256, Suite::Cbc256Sha1];

    pub fn name(self) -> &'static str {
        match self {
            Self::Gcm256 => "gcm256",
            Self::Cbc256Sha1 => "cbc256-sha1",
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            Self::Gcm256 => "AES-GCM-256",
            Self::Cbc256Sha1 => "AES-CBC-256/SHA1-96",
        }
    }
    pub fn ike_proposal(self) -> &'static str {
        "aes256-sha256-modp2048"
    }
    pub fn esp_proposal(self) -> &'static str {
        match self {
            Self::Gcm256 => "aes256gcm16",
            Self::Cbc256Sha1 => "aes256-sha1",
        }
    }
}

/// Plaintext in and ESP out, or the reverse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Encrypt,
    Decrypt,
}

pub const SIZES: [usize; 3] = [64, 512, 1400];
pub const TUNNELS: [usize; 2] = [1, 2];

/// The name `--filter` matches: gcm256/decrypt/1400/1t.
pub fn case_name(suite: Suite, dir: Direction, size: usize, tunnels: usize) -> String {
    let d = match dir {
        Direction::Encrypt => "encrypt",
        Direction::Decrypt => "decrypt",
    };
    format!("{}/{d}/{size}/{tunnels}t", suite.name())
}

/// Every case of a suite (direction, size, tunnels), in the order they
/// are measured.
fn cases() -> impl Iterator<Item = (Direction, usize, usize)> {
    [Direction::Encrypt, Direction::Decrypt]
        .into_iter()
        .flat_map(|d| SIZES.into_iter().map(move |s| (d, s)))
        .flat_map(|(d, s)| TUNNELS.into_iter().map(move |t| (d, s, t)))
}

/// `--filter`'s text, refused if it names no case at all.
fn check_filter(filter: Option<&str>) -> Result<()> {
    let Some(f) = filter else { return Ok(()) };
    let any = Suite::ALL
        .into_iter()
        .any(|suite| cases().any(|(d, s, t)| case_name(suite, d, s, t).contains(f)));
    if !any {
        let suites: Vec<&str> = Suite::ALL.iter().map(|s| s.name()).collect();
        bail!(
            "--filter {f:?} matches no case: names are <suite>/<encrypt|decrypt>/<size>/<tunnels>t, \
             such as {} (suites: {}; sizes: {SIZES:?}; tunnels: {TUNNELS:?})",
            case_name(Suite::Gcm256, Direction::Decrypt, 1400, 1),
            suites.join(", ")
        );
    }
    Ok(())
}

fn selected_kinds(args: &BenchArgs) -> Result<Vec<DutKind>> {
    if args.devices.is_empty() {
        return Ok(DutKind::DEFAULT.to_vec());
    }
    args.devices
        .iter()
        .map(|d| {
            DutKind::parse(d.trim()).with_context(|| {
                format!(
                    "--devices: {d:?} is not one of xesp, null, xesp-bp, null-bp, kernel, strongswan"
                )
            })
        })
        .collect()
}

/// Runs the benchmark and writes the report.
pub fn run(args: &BenchArgs) -> Result<()> {
    setup::require_root("run the benchmark (namespaces, XDP)")?;
    setup::ensure()?;
    let started = Instant::now();
    let packets = args
        .packets
        .unwrap_or(if args.quick { 60_000 } else { 300_000 })
        .max(1000);
    let repeat = args.repeat.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let kinds = selected_kinds(args)?;
    check_filter(args.filter.as_deref())?;
    let wanted = |suite, dir, size, tunnels| {
        args.filter
            .as_deref()
            .is_none_or(|f| case_name(suite, dir, size, tunnels).contains(f))
    };
    let out = match &args.out {
        Some(o) => o.clone(),
        None => setup::project_root().join("target/bench").join(utc_stamp()),
    };
    std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
    eprintln!("[bench] building xesp, the null forwarder and xesp-loadgen (release)");
    let bins = ends::build_release()?;
    let built = started.elapsed();
    eprintln!(
        "[bench] {packets} packets per trial, {repeat} repetition(s), sent with {}; report in {}",
        args.sender,
        out.display()
    );
    let topo = Topology::build()?;
    let psk = random_psk()?;
    let psk_file = out.join("psk");
    dut::write_secret(&psk_file, &psk)?;
    let mut lan = End::start(
        "LAN",
        &topo.lan,
        &bins.loadgen,
        &[
            "--sink-if".into(),
            "lanh0".into(),
            "--lan-host".into(),
            LAN_HOST.to_string(),
            "--sender".into(),
            args.sender.clone(),
        ],
        &out.join("loadgen-lan.log"),
    )?;
    // The raw crypto limit, measured now on this machine, before any device runs.
    let mut raw = Vec::new();
    for size in SIZES {
        let v = lan.request(&format!("raw {size} 200000"))?;
        raw.push((
            size,
            v["seal_ns"].as_f64().unwrap_or(f64::NAN),
            v["open_ns"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    let run = Run {
        topo: &topo,
        bins: &bins,
        psk: &psk,
        psk_file: &psk_file,
        args,
        packets,
    };
    // Each device and suite with the cases it is measured in.
    let sessions: Vec<(DutKind, Suite, Vec<Case>)> = kinds
        .iter()
        .flat_map(|&kind| {
            let suites: &[Suite] = if kind.has_suite() {
                &Suite::ALL
            } else {
                &Suite::ALL[..1]
            };
            suites.iter().map(move |&suite| (kind, suite))
        })
        .map(|(kind, suite)| {
            let cases = cases()
                .filter(|&(d, s, t)| wanted(suite, d, s, t))
                .collect::<Vec<_>>();
            (kind, suite, cases)
        })
        .filter(|(_, _, cases)| !cases.is_empty())
        .collect();
    // The repetitions go round the devices: every device has one flat-out
    // trial of each case per round, so what drifts during the run (other
    // work on the host, the CPUs' clocks) falls on all of them alike and
    // their ratios hold.
    let mut reps: Vec<Vec<Vec<Measured>>> = sessions
        .iter()
        .map(|(_, _, cases)| vec![Vec::new(); cases.len()])
        .collect();
    let mut trials = Vec::new();
    let mut k = 0;
    for round in 1..=repeat {
        for ((kind, suite, cases), reps) in sessions.iter().zip(&mut reps) {
            let place = out.join(format!("round{round}"));
            let mut up = Up::start(&run, &mut lan, *kind, *suite, &place)?;
            for (&(dir, size, tunnels), case_reps) in cases.iter().zip(reps.iter_mut()) {
                let m = up.measure(dir, size, tunnels, None)?;
                eprintln!(
                    "[bench round {round}/{repeat}] {} {}: {:.0} pkt/s",
                    kind.label(),
                    case_name(*suite, dir, size, tunnels),
                    m.pps
                );
                case_reps.push(m);
                if round < repeat {
                    continue;
                }
                k += 1;
                let (seal, open) = raw
                    .iter()
                    .find(|r| r.0 == size)
                    .map_or((f64::NAN, f64::NAN), |r| (r.1, r.2));
                let t = Trial::new(
                    *kind,
                    *suite,
                    dir,
                    size,
                    tunnels,
                    std::mem::take(case_reps),
                    match dir {
                        Direction::Encrypt => seal,
                        Direction::Decrypt => open,
                    },
                );
                eprintln!("[bench {k:>3}] {}", t.progress_line());
                trials.push(t);
            }
            up.finish()?;
        }
    }
    // Offered load stepped around the peak (one tunnel), each step repeated
    // as the flat-out trials (medians judge). The flat-out median that the
    // steps are paced from is measured again in the same session, so that the
    // steps are judged against what the device did at the same time.
    let mut overload = Vec::new();
    for (kind, suite, cases) in &sessions {
        let stepped: Vec<Case> = cases
            .iter()
            .copied()
            .filter(|&(_, _, tunnels)| tunnels == 1)
            .collect();
        if args.no_overload || !kind.has_workers() || stepped.is_empty() {
            continue;
        }
        let mut up = Up::start(&run, &mut lan, *kind, *suite, &out.join("overload"))?;
        for (dir, size, tunnels) in stepped {
            let name = case_name(*suite, dir, size, tunnels);
            eprintln!("[bench      overload flat out] {} {name}", kind.label());
            let flat = (0..repeat)
                .map(|_| up.measure(dir, size, tunnels, None))
                .collect::<Result<Vec<_>>>()?;
            let peak = report::Spread::of(flat.iter().map(|m| m.pps)).median;
            if peak.is_nan() || peak <= 0.0 {
                continue;
            }
            let mut steps = Vec::new();
            for pct in OVERLOAD_STEPS {
                let rate = peak * f64::from(pct) / 100.0;
                eprintln!("[bench      overload {pct:>3}%] {} {name}", kind.label());
                let reps = (0..repeat)
                    .map(|_| up.measure(dir, size, tunnels, Some(rate)))
                    .collect::<Result<Vec<_>>>()?;
                steps.extend(report::Step::new(pct, rate, reps));
            }
            overload.push(report::Overload {
                dut: *kind,
                suite: *suite,
                direction: dir,
                size,
                flat_out_pps: peak,
                steps,
            });
        }
        up.finish()?;
    }
    drop(lan);
    let r = report::Report::new(
        trials,
        overload,
        raw,
        packets,
        repeat,
        built,
        started.elapsed(),
    );
    println!("{}", r.markdown());
    r.write(&out)?;
    chart::draw(&r.trials, &out.join("throughput.png"))?;
    eprintln!(
        "[bench] done in {:.0} s; {} and {} written",
        started.elapsed().as_secs_f64(),
        out.join("report.json").display(),
        out.join("throughput.png").display()
    );
    Ok(())
}

/// A case: direction, inner packet size, tunnels.
type Case = (Direction, usize, usize);

/// What every session of the run shares.
struct Run<'a> {
    topo: &'a Topology,
    bins: &'a ends::Binaries,
    psk: &'a str,
    psk_file: &'a std::path::Path,
    args: &'a BenchArgs,
    packets: u64,
}

/// One device with one ESP suite between the ends: the DMZ end's IKE peer
/// started for the suite, the device started, its tunnels up, its routes
/// set, both directions warmed up.
struct Up<'r> {
    run: &'r Run<'r>,
    lan: &'r mut End,
    az: End,
    d: Dut,
}

impl<'r> Up<'r> {
    /// Starts it; its logs and configuration go under `place`.
    fn start(
        run: &'r Run<'r>,
        lan: &'r mut End,
        kind: DutKind,
        suite: Suite,
        place: &std::path::Path,
    ) -> Result<Self> {
        let args = run.args;
        std::fs::create_dir_all(place).with_context(|| format!("creating {}", place.display()))?;
        eprintln!(
            "[bench] {} with {}: starting{} ({})",
            kind.label(),
            if kind.has_suite() {
                suite.label()
            } else {
                "no IPsec"
            },
            if kind.has_tunnels() {
                ", tunnels coming up"
            } else {
                ""
            },
            place.display()
        );
        let mut az = End::start(
            "DMZ",
            &run.topo.az,
            &run.bins.loadgen,
            &[
                "--sink-if".into(),
                "az0".into(),
                "--peer".into(),
                format!("{},{}", PEERS[0], PEERS[1]),
                "--dut".into(),
                DUT_PUBLIC.to_string(),
                "--psk-file".into(),
                run.psk_file.display().to_string(),
                "--ike".into(),
                suite.ike_proposal().into(),
                "--esp".into(),
                suite.esp_proposal().into(),
                "--sender".into(),
                args.sender.clone(),
            ],
            &place.join(format!("loadgen-az-{}-{}.log", kind.label(), suite.name())),
        )?;
        let mut d = Dut::start(
            kind,
            run.topo,
            suite,
            run.psk,
            (run.bins, &args.busy_poll),
            place,
        )?;
        if kind.has_tunnels() {
            wait_tunnels(&mut az, &mut d)?;
        }
        d.route(run.topo)?;
        let mut up = Self { run, lan, az, d };
        // Warm up both directions (caches, neighbour entries, first frames).
        for dir in [Direction::Encrypt, Direction::Decrypt] {
            up.trial(dir, 64, 2, 2000, None)?;
        }
        Ok(up)
    }

    /// One trial: prepare, send (at `rate` packets/s, or flat out) while
    /// watching the sink, wait until it is quiet.
    fn trial(
        &mut self,
        dir: Direction,
        size: usize,
        tunnels: usize,
        packets: u64,
        rate: Option<f64>,
    ) -> Result<Measured> {
        let (gen_end, sink) = ends_for(dir, self.lan, &mut self.az);
        let (topo, d, xesp) = (self.run.topo, &self.d, &self.run.bins.xesp);
        gen_end.request(&format!(
            "prepare {tunnels} {size} {packets} {}",
            d.kind.dmz_mode()
        ))?;
        let kind = d.kind;
        let (d0, b0, t0) = sink_counts(sink, dir, kind)?;
        let cpu_of = || d.pid().map(cpu_ns);
        let user_of = || d.pid().map(user_ns);
        let diag0 = diag::snapshot(topo, d, xesp);
        let cpu0 = cpu_of();
        let user0 = user_of();
        let start = Instant::now();
        let send = match rate {
            Some(r) => format!("send {}", r.round().max(1.0) as u64),
            None => "send".to_string(),
        };
        let (sent_reply, timeline, (last, bad, per_tunnel)) = std::thread::scope(|s| {
            let sender = s.spawn(|| gen_end.request(&send));
            let mut last = (d0, b0, t0);
            let mut last_change = start;
            let mut timeline = vec![(Duration::ZERO, d0)];
            loop {
                std::thread::sleep(Duration::from_millis(5));
                let now = sink_counts(sink, dir, kind)?;
                if now.0 != last.0 {
                    last = now;
                    last_change = Instant::now();
                    timeline.push((last_change - start, now.0));
                }
                let quiet = last_change.elapsed() > Duration::from_millis(300);
                if (sender.is_finished() && quiet) || start.elapsed() > Duration::from_secs(60) {
                    break;
                }
            }
            let reply = sender
                .join()
                .unwrap_or_else(|_| Err(anyhow::anyhow!("sender panicked")));
            Ok::<_, anyhow::Error>((reply, timeline, last))
        })?;
        let sent_reply = sent_reply?;
        let cpu = cpu_of().zip(cpu0).map(|(b, a)| b.saturating_sub(a));
        let user = user_of().zip(user0).map(|(b, a)| b.saturating_sub(a));
        let counters = diag::delta(&diag0, &diag::snapshot(topo, d, xesp));
        let sent = sent_reply["sent"].as_u64().unwrap_or(0);
        let send_secs = sent_reply["seconds"].as_f64().unwrap_or(f64::NAN);
        let delivered = last - d0;
        let (bulk, seconds) = bulk_rate(&timeline, d0);
        Ok(Measured {
            sent,
            delivered,
            bad: bad - b0,
            seconds,
            offered_pps: sent as f64 / send_secs,
            not_sent: sent_reply["not_sent"].as_u64().unwrap_or(0),
            tx_dropped: sent_reply["tx_dropped"].as_u64().unwrap_or(0),
            pps: if seconds > 0.0 {
                bulk as f64 / seconds
            } else {
                0.0
            },
            cpu_ns: cpu,
            user_ns: user,
            per_tunnel: [per_tunnel[0] - t0[0], per_tunnel[1] - t0[1]],
            counters,
        })
    }

    /// One trial of a case, flat out or at `rate` packets/s.
    fn measure(
        &mut self,
        dir: Direction,
        size: usize,
        tunnels: usize,
        rate: Option<f64>,
    ) -> Result<Measured> {
        let m = self.trial(dir, size, tunnels, self.run.packets, rate)?;
        if let Some(rate) = rate {
            eprintln!(
                "[bench      overload] offered {:>9.0} (asked {rate:.0}) delivered {:>9.0} pkt/s, loss {:.1}%, not sent {}, dropped on send {}",
                m.offered_pps,
                m.pps,
                100.0 * (1.0 - m.delivered as f64 / m.sent.max(1) as f64),
                m.not_sent,
                m.tx_dropped
            );
        }
        eprintln!("[bench      counted] {}", diag::drops_line(&m.counters));
        if !self.d.is_running() {
            bail!(
                "{} stopped during the run; see {}",
                self.d.kind.label(),
                self.d.dir().display()
            );
        }
        Ok(m)
    }

    /// Says what the peer checked of the device's ESP, and stops both.
    fn finish(mut self) -> Result<()> {
        let samples = self.az.request("counters")?;
        let kind = self.d.kind;
        eprintln!(
            "[bench] {}: ESP samples checked by the peer: {}{}",
            kind.label(),
            samples["samples"],
            if matches!(kind, DutKind::Null | DutKind::NullBusyPoll) {
                " (all invalid, as they must be: the null forwarder encrypts nothing)"
            } else {
                ""
            }
        );
        self.d.stop(self.run.topo);
        Ok(())
    }
}

fn ends_for<'a>(dir: Direction, lan: &'a mut End, az: &'a mut End) -> (&'a mut End, &'a mut End) {
    match dir {
        Direction::Encrypt => (lan, az),
        Direction::Decrypt => (az, lan),
    }
}

/// Waits until the peer has both tunnels' CHILD_SAs (and the sink their SPIs).
fn wait_tunnels(az: &mut End, d: &mut Dut) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let v = az.request("status")?;
        let up = v["tunnels"]
            .as_array()
            .map_or(0, |t| t.iter().filter(|t| t["up"] == true).count());
        if up == PEERS.len() {
            // The device installs its side as it sends the last message: a moment more.
            std::thread::sleep(Duration::from_millis(300));
            az.request("status")?;
            return Ok(());
        }
        if !d.is_running() || Instant::now() > deadline {
            bail!(
                "{}: {up} of {} tunnels up with the benchmark's peer; see {}",
                d.kind.label(),
                PEERS.len(),
                d.dir().display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What one trial measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Measured {
    pub sent: u64,
    pub delivered: u64,
    /// Delivered with the wrong SPI or a damaged payload.
    pub bad: u64,
    /// From the first send to the last delivery.
    pub seconds: f64,
    /// How fast the generator offered them.
    pub offered_pps: f64,
    /// Packets the generator could not hand to the kernel.
    pub not_sent: u64,
    /// Packets the generator's interface dropped on transmit (its peer's
    /// queue full), counted in `sent`.
    pub tx_dropped: u64,
    pub pps: f64,
    /// The device's threads' CPU time (none for kernel forwarding).
    pub cpu_ns: Option<u64>,
    /// Of that, in user mode (clock ticks: coarse).
    pub user_ns: Option<u64>,
    pub per_tunnel: [u64; 2],
    /// The counters that grew during the trial (see [`diag`]).
    pub counters: diag::Counters,
}

fn sink_counts(sink: &mut End, dir: Direction, kind: DutKind) -> Result<(u64, u64, [u64; 2])> {
    let v = sink.request("counters")?;
    let c = |n: &str| v["sink"][n].as_u64().unwrap_or(0);
    Ok(match dir {
        // The kernel forwards the inner packets as they are.
        Direction::Encrypt if kind == DutKind::Kernel => {
            (c("plain_valid"), c("plain_invalid"), [0, 0])
        }
        Direction::Encrypt => {
            let t = [c("esp_tunnel0"), c("esp_tunnel1")];
            (t[0] + t[1], c("esp_unknown_spi"), t)
        }
        Direction::Decrypt => (c("plain_valid"), c("plain_invalid"), [0, 0]),
    })
}

/// The rate is taken over the bulk of a trial: the packets up to 99% of
/// what finally arrived, and the time they took from the first send. A few
/// stragglers (a retransmit timer, a late wake-up) do not stretch it.
/// `timeline` holds (time since the start, sink count) at each change.
fn bulk_rate(timeline: &[(Duration, u64)], base: u64) -> (u64, f64) {
    let Some(&(_, last)) = timeline.last() else {
        return (0, 0.0);
    };
    let target = base + (last - base).saturating_mul(99).div_ceil(100);
    timeline
        .iter()
        .find(|(_, n)| *n >= target)
        .map_or((0, 0.0), |(t, n)| (n - base, t.as_secs_f64()))
}

/// A fresh pre-shared key for the run (letters and digits, 32 of them).
fn random_psk() -> Result<String> {
    let mut b = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut b)?;
    const ABC: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    Ok(b.iter()
        .map(|x| ABC[*x as usize % ABC.len()] as char)
        .collect())
}

/// The time now as 20261125T071500Z (UTC).
fn utc_stamp() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_filter_that_names_no_case_is_refused_with_the_names() {
        assert!(check_filter(None).is_ok());
        assert!(check_filter(Some("cbc256-sha1/decrypt/64/1t")).is_ok());
        assert!(check_filter(Some("/2t")).is_ok());
        let e = check_filter(Some("cbc256/decrypt"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"cbc256/decrypt\" matches no case"), "{e}");
        assert!(
            e.contains("cbc256-sha1") && e.contains("gcm256/decrypt/1400/1t"),
            "{e}"
        );
    }

    #[test]
    fn dates_from_days() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_417), (2025, 11, 25));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
        assert_eq!(utc_stamp().len(), 16);
    }

    #[test]
    fn rate_over_the_bulk_ignores_stragglers() {
        let ms = Duration::from_millis;
        // 1000 packets in 100 ms, then 5 more 400 ms later.
        let t = [(ms(0), 10), (ms(50), 510), (ms(100), 1010), (ms(500), 1015)];
        let (n, secs) = bulk_rate(&t, 10);
        assert_eq!((n, secs), (1000, 0.1));
        assert_eq!(bulk_rate(&[(ms(0), 7)], 7), (0, 0.0), "nothing arrived");
        assert_eq!(bulk_rate(&[], 0), (0, 0.0));
    }

    #[test]
    fn psk_is_fresh_and_plain() {
        let (a, b) = (random_psk().unwrap(), random_psk().unwrap());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
