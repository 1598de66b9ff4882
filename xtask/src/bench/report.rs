//! The benchmark's report: a Markdown table with the ratios, the goals next
//! to what was measured, JSON, and a bar chart.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{
    Direction, Measured, Suite,
    dut::DutKind,
    png::{BLACK, Canvas, GREY},
};

/// One case of the run, with what it is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub dut: DutKind,
    pub suite: Suite,
    pub direction: Direction,
    /// Inner (plaintext) IPv4 packet size in octets.
    pub size: usize,
    pub tunnels: usize,
    #[serde(flatten)]
    pub m: Measured,
    pub gbps: f64,
    pub loss: f64,
    pub cpu_ns_per_packet: f64,
    /// Raw ring AES-256-GCM seal (encrypt) or open (decrypt) of this size.
    pub raw_aead_ns: f64,
    pub cpu_vs_raw: f64,
    /// Packets/s of this device over strongSwan's in the same case (xesp only).
    pub vs_strongswan: Option<f64>,
}

impl Trial {
    pub fn new(
        dut: DutKind,
        suite: Suite,
        direction: Direction,
        size: usize,
        tunnels: usize,
        m: Measured,
        raw_aead_ns: f64,
    ) -> Self {
        let cpu = if m.delivered > 0 {
            m.cpu_ns as f64 / m.delivered as f64
        } else {
            f64::NAN
        };
        Self {
            dut,
            suite,
            direction,
            size,
            tunnels,
            gbps: m.pps * size as f64 * 8.0 / 1e9,
            loss: if m.sent > 0 {
                1.0 - m.delivered as f64 / m.sent as f64
            } else {
                f64::NAN
            },
            cpu_ns_per_packet: cpu,
            raw_aead_ns,
            cpu_vs_raw: cpu / raw_aead_ns,
            vs_strongswan: None,
            m,
        }
    }

    fn same_case(&self, o: &Trial) -> bool {
        self.suite == o.suite
            && self.direction == o.direction
            && self.size == o.size
            && self.tunnels == o.tunnels
    }

    pub fn progress_line(&self) -> String {
        format!(
            "{:<10} {:<19} {:<7} {:>4} B {} tun: {:>9} pkt/s {:>6.2} Gbit/s loss {:>5.1}% CPU {:>7.0} ns/pkt ({} sent, offered {:.0} pkt/s)",
            self.dut.label(),
            self.suite.label(),
            dir_name(self.direction),
            self.size,
            self.tunnels,
            fmt_int(self.m.pps),
            self.gbps,
            self.loss * 100.0,
            self.cpu_ns_per_packet,
            self.m.sent,
            self.m.offered_pps,
        )
    }
}

fn dir_name(d: Direction) -> &'static str {
    match d {
        Direction::Encrypt => "encrypt",
        Direction::Decrypt => "decrypt",
    }
}

fn fmt_int(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.0}")
    } else {
        "-".into()
    }
}

fn fmt_ratio(x: Option<f64>) -> String {
    match x {
        Some(x) if x.is_finite() => format!("{x:.1}x"),
        _ => "-".into(),
    }
}

#[derive(Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    pub met: bool,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub machine: String,
    pub packets_per_trial: u64,
    pub repetitions: u32,
    pub build_seconds: f64,
    pub total_seconds: f64,
    /// (size, raw seal ns, raw open ns)
    pub raw_aead: Vec<(usize, f64, f64)>,
    pub trials: Vec<Trial>,
    pub goals: Vec<Goal>,
}

impl Report {
    pub fn new(
        mut trials: Vec<Trial>,
        raw_aead: Vec<(usize, f64, f64)>,
        packets: u64,
        repetitions: u32,
        built: Duration,
        total: Duration,
    ) -> Self {
        let base: Vec<Trial> = trials
            .iter()
            .filter(|t| t.dut == DutKind::StrongSwan)
            .cloned()
            .collect();
        for t in trials.iter_mut().filter(|t| t.dut == DutKind::Xesp) {
            t.vs_strongswan = base
                .iter()
                .find(|b| b.same_case(t))
                .map(|b| t.m.pps / b.m.pps);
        }
        let goals = goals(&trials);
        Self {
            machine: format!(
                "{} CPUs, {}",
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .map(|s| format!("Linux {}", s.trim()))
                    .unwrap_or_default()
            ),
            packets_per_trial: packets,
            repetitions,
            build_seconds: built.as_secs_f64(),
            total_seconds: total.as_secs_f64(),
            raw_aead,
            trials,
            goals,
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## cargo xtask bench: {} packets per trial, median of {}; {}\n",
            self.packets_per_trial, self.repetitions, self.machine
        );
        s.push_str("| device | ESP | direction | size | tunnels | pkt/s | Gbit/s | loss | CPU ns/pkt | CPU / raw AEAD | vs strongSwan |\n");
        s.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for t in &self.trials {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.3} | {:.1}% | {:.0} | {:.2}x | {} |",
                t.dut.label(),
                t.suite.label(),
                dir_name(t.direction),
                t.size,
                t.tunnels,
                fmt_int(t.m.pps),
                t.gbps,
                t.loss * 100.0,
                t.cpu_ns_per_packet,
                t.cpu_vs_raw,
                fmt_ratio(t.vs_strongswan),
            );
        }
        s.push_str("\nRaw ring AES-256-GCM on this machine, same run (seal / open, ns):");
        for (size, seal, open) in &self.raw_aead {
            let _ = write!(s, " {size} B {seal:.0} / {open:.0};");
        }
        s.push_str("\n\n### Goals\n\n| goal | measured | met |\n|---|---|---|\n");
        for g in &self.goals {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                g.goal,
                g.measured,
                if g.met { "yes" } else { "no" }
            );
        }
        let _ = write!(
            s,
            "\npkt/s and Gbit/s: intact inner packets delivered per second, from the first sent until 99% of \
             them had arrived. CPU ns/pkt: the device's own threads (schedstat) per delivered packet; kernel \
             work in softirq on the sending CPU is not counted. Build {:.0} s, run {:.0} s.",
            self.build_seconds, self.total_seconds
        );
        s
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("report.json"), json)
            .with_context(|| format!("writing {}", dir.join("report.json").display()))?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        std::fs::write(dir.join("throughput.png"), chart(&self.trials).png())?;
        Ok(())
    }
}

fn xesp_cases(trials: &[Trial]) -> impl Iterator<Item = &Trial> {
    trials.iter().filter(|t| t.dut == DutKind::Xesp)
}

/// The goals, each next to the measurement that decides it.
fn goals(trials: &[Trial]) -> Vec<Goal> {
    let mut g = Vec::new();
    let at64: Vec<f64> = xesp_cases(trials)
        .filter(|t| t.size == 64 && t.tunnels == 1)
        .filter_map(|t| t.vs_strongswan)
        .collect();
    let min64 = at64.iter().copied().fold(f64::INFINITY, f64::min);
    g.push(Goal {
        goal: "64 B: at least 20x strongSwan's packets/s".into(),
        measured: format!("{min64:.1}x (lowest of {} cases, one tunnel)", at64.len()),
        met: !at64.is_empty() && min64 >= 20.0,
    });
    let big: Vec<&Trial> = xesp_cases(trials)
        .filter(|t| t.size == 1400 && t.tunnels == 1)
        .collect();
    let best = big.iter().map(|t| t.gbps).fold(0.0, f64::max);
    let per_core = big
        .iter()
        .map(|t| 1400.0 * 8.0 / t.cpu_ns_per_packet)
        .fold(0.0, f64::max);
    g.push(Goal {
        goal: "1400 B: at least 10 Gbit/s on one core".into(),
        measured: format!(
            "{best:.2} Gbit/s delivered; {per_core:.2} Gbit/s per core of the device's CPU time"
        ),
        met: !big.is_empty() && best >= 10.0,
    });
    let worst = big
        .iter()
        .filter(|t| t.suite == Suite::Gcm256)
        .map(|t| t.cpu_vs_raw)
        .fold(0.0, f64::max);
    g.push(Goal {
        goal: "1400 B, AES-GCM-256: CPU per packet within 2x the raw AEAD".into(),
        measured: format!("{worst:.2}x (worst direction)"),
        met: worst > 0.0 && worst <= 2.0,
    });
    let mut scale = Vec::new();
    for one in xesp_cases(trials).filter(|t| t.tunnels == 1 && t.size == 1400) {
        if let Some(two) = xesp_cases(trials).find(|t| {
            t.tunnels == 2
                && t.size == one.size
                && t.suite == one.suite
                && t.direction == one.direction
        }) {
            scale.push(two.m.pps / one.m.pps);
        }
    }
    let low = scale.iter().copied().fold(f64::INFINITY, f64::min);
    g.push(Goal {
        goal: "two tunnels on two cores: at least 1.8x one".into(),
        measured: format!(
            "{low:.2}x (lowest at 1400 B; {} CPUs here, shared with the generator and sink)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        ),
        met: !scale.is_empty() && low >= 1.8,
    });
    g
}

/// Packets/s per case, xesp next to strongSwan, on a log scale.
fn chart(trials: &[Trial]) -> Canvas {
    let cases: Vec<&Trial> = xesp_cases(trials).collect();
    let (left, top, bar, gap, plot_h) = (90, 50, 10, 14, 320);
    let w = left + cases.len() * (2 * bar + gap) + 40;
    let mut c = Canvas::new(w.max(400), top + plot_h + 150);
    c.text(
        10,
        10,
        "PACKETS/S DELIVERED (LOG SCALE): XESP (DARK) VS STRONGSWAN (LIGHT)",
        2,
        BLACK,
    );
    let (lo, hi) = (3.0f64, 8.0f64); // 1e3 .. 1e8 pkt/s
    let y_of = |pps: f64| {
        let l = pps.max(1.0).log10().clamp(lo, hi);
        top + plot_h - ((l - lo) / (hi - lo) * plot_h as f64) as usize
    };
    for e in 3..=8 {
        let y = y_of(10f64.powi(e));
        c.rect(left - 5, y, w - left, 1, GREY);
        c.text(10, y.saturating_sub(3), &format!("1E{e}"), 1, BLACK);
    }
    for (i, t) in cases.iter().enumerate() {
        let x = left + i * (2 * bar + gap);
        let base = trials
            .iter()
            .find(|b| b.dut == DutKind::StrongSwan && b.same_case(t));
        let y = y_of(t.m.pps);
        c.rect(x, y, bar, top + plot_h - y, [30, 80, 160]);
        if let Some(b) = base {
            let y = y_of(b.m.pps);
            c.rect(x + bar, y, bar, top + plot_h - y, [150, 190, 230]);
        }
        let label = [
            if t.suite == Suite::Gcm256 { "G" } else { "C" }.to_string(),
            if t.direction == Direction::Encrypt {
                "E"
            } else {
                "D"
            }
            .to_string(),
            t.size.to_string(),
            format!("{}T", t.tunnels),
        ];
        for (row, l) in label.iter().enumerate() {
            c.text(x, top + plot_h + 8 + row * 10, l, 1, BLACK);
        }
    }
    c.text(
        10,
        top + plot_h + 60,
        "G: AES-GCM-256  C: AES-CBC-256/SHA1  E: ENCRYPT  D: DECRYPT  SIZE IN BYTES  1T/2T: TUNNELS",
        1,
        BLACK,
    );
    c
}
