//! The benchmark's report: a Markdown table with the baselines of the same
//! run (the null forwarder, kernel forwarding, strongSwan) and the ratios to
//! them, the overload steps, the goals next to what was measured, JSON, and
//! a chart.

use std::{fmt::Write as _, path::Path, time::Duration};

use anyhow::{Context, Result};
use serde::Serialize;

use super::{Direction, Measured, OVERLOAD_STEPS, SIZES, Suite, dut::DutKind};

/// Lowest, middle and highest of the repetitions.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    /// Of the finite values; all NaN when there is none.
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self {
                min: f64::NAN,
                median: f64::NAN,
                max: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self {
            min: v[0],
            median,
            max: v[n - 1],
        }
    }

    fn show(&self, digits: usize) -> String {
        if !self.median.is_finite() {
            return "-".into();
        }
        if self.min == self.max {
            return format!("{:.digits$}", self.median);
        }
        format!(
            "{:.digits$} ({:.digits$}–{:.digits$})",
            self.median, self.min, self.max
        )
    }
}

/// One case of the run, with what it is compared with.
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub dut: DutKind,
    pub suite: Suite,
    pub direction: Direction,
    /// Inner (plaintext) IPv4 packet size in octets.
    pub size: usize,
    pub tunnels: usize,
    /// Every repetition.
    pub reps: Vec<Measured>,
    /// Delivered packets/s over the repetitions.
    pub pps: Spread,
    pub gbps: f64,
    /// Of the median repetition (by packets/s).
    pub loss: f64,
    /// The device's CPU time per delivered packet over the repetitions (none
    /// for kernel forwarding: it has no threads of its own).
    pub cpu_ns_per_packet: Spread,
    /// The workers' system calls (receive polls, TX kicks, fill-ring
    /// wake-ups, busy polls, statistics reads) per delivered packet, over
    /// the repetitions (xesp and the null forwarder only).
    pub syscalls_per_packet: Spread,
    /// Raw ring AES-256-GCM seal (encrypt) or open (decrypt) of this size.
    pub raw_aead_ns: f64,
    /// Packets/s over the null forwarder's in the same case (xesp only).
    pub vs_null: Option<f64>,
    /// CPU per packet minus the null forwarder's, over the raw AEAD (xesp only).
    pub marginal_cpu_ns: Option<f64>,
    pub marginal_vs_raw: Option<f64>,
    /// Packets/s over kernel forwarding's of the same size and tunnels.
    pub vs_kernel: Option<f64>,
    /// Packets/s over strongSwan's in the same case.
    pub vs_strongswan: Option<f64>,
}

/// The worker counters that count system calls (`syscall_*`).
const SYSCALL_COUNTER: &str = ":syscall_";

/// The workers' system calls per delivered packet; NaN for a device with
/// no such counters (kernel forwarding, strongSwan).
fn syscalls_per_packet(m: &Measured) -> f64 {
    let mut counted = m
        .counters
        .iter()
        .filter(|(k, _)| k.contains(SYSCALL_COUNTER))
        .map(|(_, v)| *v)
        .peekable();
    if counted.peek().is_none() || m.delivered == 0 {
        return f64::NAN;
    }
    counted.sum::<u64>() as f64 / m.delivered as f64
}

fn cpu_per_packet(m: &Measured) -> f64 {
    match m.cpu_ns {
        Some(c) if m.delivered > 0 => c as f64 / m.delivered as f64,
        _ => f64::NAN,
    }
}

impl Trial {
    pub fn new(
        dut: DutKind,
        suite: Suite,
        direction: Direction,
        size: usize,
        tunnels: usize,
        mut reps: Vec<Measured>,
        raw_aead_ns: f64,
    ) -> Self {
        reps.sort_by(|a, b| a.pps.total_cmp(&b.pps));
        let pps = Spread::of(reps.iter().map(|m| m.pps));
        let mid = reps.get(reps.len() / 2).cloned().unwrap_or_default();
        Self {
            dut,
            suite,
            direction,
            size,
            tunnels,
            gbps: pps.median * size as f64 * 8.0 / 1e9,
            loss: if mid.sent > 0 {
                1.0 - mid.delivered as f64 / mid.sent as f64
            } else {
                f64::NAN
            },
            cpu_ns_per_packet: Spread::of(reps.iter().map(cpu_per_packet)),
            syscalls_per_packet: Spread::of(reps.iter().map(syscalls_per_packet)),
            pps,
            raw_aead_ns,
            vs_null: None,
            marginal_cpu_ns: None,
            marginal_vs_raw: None,
            vs_kernel: None,
            vs_strongswan: None,
            reps,
        }
    }

    /// The same case: transform (unless one side is kernel forwarding),
    /// direction, size and tunnels.
    fn same_case(&self, o: &Trial) -> bool {
        (self.suite == o.suite || !self.dut.has_suite() || !o.dut.has_suite())
            && self.direction == o.direction
            && self.size == o.size
            && self.tunnels == o.tunnels
    }

    fn cpu(&self) -> f64 {
        self.cpu_ns_per_packet.median
    }

    pub fn progress_line(&self) -> String {
        let mid = self
            .reps
            .get(self.reps.len() / 2)
            .cloned()
            .unwrap_or_default();
        format!(
            "{:<10} {:<19} {:<7} {:>4} B {} tun: {:>9} pkt/s {:>6.2} Gbit/s loss {:>5.1}% CPU {:>7.0} ns/pkt ({} sent, offered {:.0} pkt/s)",
            self.dut.label(),
            suite_label(self),
            dir_name(self.direction),
            self.size,
            self.tunnels,
            fmt_int(self.pps.median),
            self.gbps,
            self.loss * 100.0,
            self.cpu(),
            mid.sent,
            mid.offered_pps,
        )
    }
}

fn suite_label(t: &Trial) -> &'static str {
    if t.dut.has_suite() {
        t.suite.label()
    } else {
        "none (no IPsec)"
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
        Some(x) if x.is_finite() => format!("{x:.2}x"),
        _ => "-".into(),
    }
}

fn fmt_pct(x: Option<f64>) -> String {
    match x {
        Some(x) if x.is_finite() => format!("{:.0}%", x * 100.0),
        _ => "-".into(),
    }
}

/// One step of offered load, measured as often as the flat-out trials.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// Offered load asked for, in percent of the flat-out median.
    pub percent: u32,
    pub asked_pps: f64,
    /// Delivered packets/s over the repetitions.
    pub delivered_pps: Spread,
    /// The repetition whose delivered rate is the median.
    #[serde(flatten)]
    pub m: Measured,
}

impl Step {
    /// The step from its repetitions (at least one).
    pub fn new(percent: u32, asked_pps: f64, mut reps: Vec<Measured>) -> Option<Self> {
        let delivered_pps = Spread::of(reps.iter().map(|m| m.pps));
        reps.sort_by(|a, b| a.pps.total_cmp(&b.pps));
        let m = reps.get(reps.len().checked_sub(1)? / 2)?.clone();
        Some(Self {
            percent,
            asked_pps,
            delivered_pps,
            m,
        })
    }
}

/// A case measured under offered load stepped from 50% to 200% of its peak.
#[derive(Debug, Clone, Serialize)]
pub struct Overload {
    pub dut: DutKind,
    pub suite: Suite,
    pub direction: Direction,
    pub size: usize,
    /// The median delivered packets/s of the flat-out repetitions.
    pub flat_out_pps: f64,
    pub steps: Vec<Step>,
}

impl Overload {
    /// The peak: the best median delivered rate, flat out or at any step
    /// (medians, so that one lucky repetition does not set the bar).
    pub fn peak(&self) -> f64 {
        self.steps
            .iter()
            .map(|s| s.m.pps)
            .fold(self.flat_out_pps, f64::max)
    }

    /// Delivered at the highest step over the peak.
    pub fn at_top(&self) -> Option<f64> {
        let top = self.steps.iter().max_by_key(|s| s.percent)?;
        Some(top.m.pps / self.peak())
    }
}

#[derive(Debug, Serialize)]
pub struct Goal {
    pub goal: String,
    pub measured: String,
    /// `None` when the run measured nothing that decides it.
    pub met: Option<bool>,
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
    pub overload: Vec<Overload>,
    pub goals: Vec<Goal>,
}

impl Report {
    pub fn new(
        mut trials: Vec<Trial>,
        overload: Vec<Overload>,
        raw_aead: Vec<(usize, f64, f64)>,
        packets: u64,
        repetitions: u32,
        built: Duration,
        total: Duration,
    ) -> Self {
        compare(&mut trials);
        let goals = goals(&trials, &overload);
        Self {
            machine: format!(
                "{} CPUs, {}; xesp's workers {}={}",
                std::thread::available_parallelism().map_or(0, |n| n.get()),
                std::fs::read_to_string("/proc/sys/kernel/osrelease")
                    .map(|s| format!("Linux {}", s.trim()))
                    .unwrap_or_default(),
                super::dut::WORKER_CPUS_ENV,
                super::dut::workers_here(),
            ),
            packets_per_trial: packets,
            repetitions,
            build_seconds: built.as_secs_f64(),
            total_seconds: total.as_secs_f64(),
            raw_aead,
            trials,
            overload,
            goals,
        }
    }

    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "## cargo xtask bench: {} packets per trial, {} repetition(s), median (min–max); {}\n",
            self.packets_per_trial, self.repetitions, self.machine
        );
        s.push_str("| device | ESP | direction | size | tunnels | pkt/s | Gbit/s | loss | CPU ns/pkt | syscalls/pkt | % of null fwd | marginal CPU ns | marginal / raw AEAD | vs kernel fwd | vs strongSwan |\n");
        s.push_str("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
        for t in &self.trials {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.3} | {:.1}% | {} | {} | {} | {} | {} | {} | {} |",
                t.dut.label(),
                suite_label(t),
                dir_name(t.direction),
                t.size,
                t.tunnels,
                t.pps.show(0),
                t.gbps,
                t.loss * 100.0,
                t.cpu_ns_per_packet.show(0),
                t.syscalls_per_packet.show(3),
                fmt_pct(t.vs_null),
                t.marginal_cpu_ns.map_or("-".into(), |m| format!("{m:.0}")),
                fmt_ratio(t.marginal_vs_raw),
                fmt_ratio(t.vs_kernel),
                fmt_ratio(t.vs_strongswan),
            );
        }
        s.push_str("\nRaw ring AES-256-GCM on this machine, same run (seal / open, ns):");
        for (size, seal, open) in &self.raw_aead {
            let _ = write!(s, " {size} B {seal:.0} / {open:.0};");
        }
        if !self.overload.is_empty() {
            s.push_str("\n\n### Overload: offered load stepped around the peak (one tunnel)\n\n");
            s.push_str("| device | ESP | direction | size | flat-out pkt/s |");
            for p in OVERLOAD_STEPS {
                let _ = write!(s, " {p}%: offered → delivered |");
            }
            s.push_str(" at 200% / peak |\n|---|---|---|---:|---:|");
            for _ in OVERLOAD_STEPS {
                s.push_str("---:|");
            }
            s.push_str("---:|\n");
            for o in &self.overload {
                let _ = write!(
                    s,
                    "| {} | {} | {} | {} | {:.0} |",
                    o.dut.label(),
                    o.suite.label(),
                    dir_name(o.direction),
                    o.size,
                    o.flat_out_pps
                );
                for st in &o.steps {
                    let d = &st.delivered_pps;
                    if d.min < d.max {
                        let _ = write!(
                            s,
                            " {:.0} → {:.0} ({:.0}–{:.0}) |",
                            st.m.offered_pps, st.m.pps, d.min, d.max
                        );
                    } else {
                        let _ = write!(s, " {:.0} → {:.0} |", st.m.offered_pps, st.m.pps);
                    }
                }
                let _ = writeln!(s, " {} |", fmt_pct(o.at_top()));
            }
        }
        s.push_str("\n\n### Goals\n\n| goal | measured | met |\n|---|---|---|\n");
        for g in &self.goals {
            let _ = writeln!(
                s,
                "| {} | {} | {} |",
                g.goal,
                g.measured,
                match g.met {
                    Some(true) => "met",
                    Some(false) => "not met",
                    None => "not measured",
                }
            );
        }
        let _ = write!(
            s,
            "\npkt/s and Gbit/s: intact inner packets delivered per second, from the first sent until 99% of \
             them had arrived. CPU ns/pkt: the device's own threads (schedstat) per delivered packet; kernel \
             work in softirq on the sending CPU is not counted. syscalls/pkt: the workers' system calls \
             (receive polls, TX kicks, fill-ring wake-ups, busy polls, statistics reads, from their \
             syscall_* counters) per delivered packet. null fwd: xesp's datapath with the ESP work \
             replaced by adding/removing as many octets (a benchmark-only build). marginal CPU: xesp's CPU \
             per packet minus the null forwarder's. Overload steps: the generator paced at a share of the \
             flat-out median, each step repeated as the flat-out trials, median offered → median delivered \
             (min–max); the peak is the best median delivered, flat out or at any step. xesp's workers: \
             queue q's on the CPU after q unless XESP_AF_XDP_CPUS is set, off the CPU where tunnel q's \
             generator runs and the receive softirq fills queue q. Build {:.0} s, \
             run {:.0} s.",
            self.build_seconds, self.total_seconds
        );
        s
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let json = serde_json::to_string_pretty(self)?;
        std::fs::write(dir.join("report.json"), json)
            .with_context(|| format!("writing {}", dir.join("report.json").display()))?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }
}

/// Fills in each case's ratios to the baselines of the same run.
fn compare(trials: &mut [Trial]) {
    let all: Vec<Trial> = trials.to_vec();
    let find = |kind: DutKind, t: &Trial| all.iter().find(|b| b.dut == kind && b.same_case(t));
    for t in trials.iter_mut() {
        if t.dut != DutKind::Kernel {
            t.vs_kernel = find(DutKind::Kernel, t).map(|k| t.pps.median / k.pps.median);
        }
        // Each xesp against the null forwarder that waits the same way.
        let null = match t.dut {
            DutKind::Xesp => DutKind::Null,
            DutKind::XespBusyPoll => DutKind::NullBusyPoll,
            _ => continue,
        };
        if t.dut == DutKind::Xesp {
            t.vs_strongswan = find(DutKind::StrongSwan, t).map(|b| t.pps.median / b.pps.median);
        }
        if let Some(n) = find(null, t) {
            t.vs_null = Some(t.pps.median / n.pps.median);
            let m = t.cpu() - n.cpu();
            t.marginal_cpu_ns = Some(m);
            t.marginal_vs_raw = Some(m / t.raw_aead_ns);
        }
    }
}

fn xesp_cases(trials: &[Trial]) -> impl Iterator<Item = &Trial> {
    trials.iter().filter(|t| t.dut == DutKind::Xesp)
}

/// The lowest (or highest) of `v` with what it belongs to, for a goal's
/// "measured" column.
fn worst<'a, T>(v: impl Iterator<Item = (f64, &'a T)>, highest: bool) -> Option<(f64, &'a T)> {
    v.filter(|(x, _)| x.is_finite())
        .reduce(|a, b| if (b.0 > a.0) == highest { b } else { a })
}

fn case_of(t: &Trial) -> String {
    format!(
        "{} {} {} B {}t",
        t.suite.label(),
        dir_name(t.direction),
        t.size,
        t.tunnels
    )
}

fn missing(what: &str) -> Goal {
    Goal {
        goal: what.into(),
        measured: "not measured in this run".into(),
        met: None,
    }
}

/// The goals, each next to the measurement that decides it.
fn goals(trials: &[Trial], overload: &[Overload]) -> Vec<Goal> {
    let mut g = Vec::new();

    let what = "overload: at 200% of the peak offered, at least 90% of the peak delivered (every transform and size)";
    let xo: Vec<&Overload> = overload.iter().filter(|o| o.dut == DutKind::Xesp).collect();
    match worst(xo.iter().filter_map(|o| Some((o.at_top()?, *o))), false) {
        Some((r, o)) => g.push(Goal {
            goal: what.into(),
            measured: format!(
                "lowest {:.0}% ({} {} {} B; peak {:.0} pkt/s); {} cases",
                r * 100.0,
                o.suite.label(),
                dir_name(o.direction),
                o.size,
                o.peak(),
                xo.len()
            ),
            met: Some(xo.iter().all(|o| o.at_top().is_some_and(|r| r >= 0.9))),
        }),
        None => g.push(missing(what)),
    }

    let what =
        "at least 90% of the null forwarder's packets/s, AES-GCM-256, one tunnel, 64/512/1400 B";
    let cases: Vec<&Trial> = xesp_cases(trials)
        .filter(|t| t.suite == Suite::Gcm256 && t.tunnels == 1 && SIZES.contains(&t.size))
        .filter(|t| t.vs_null.is_some())
        .collect();
    match worst(
        cases.iter().map(|t| (t.vs_null.unwrap_or(f64::NAN), *t)),
        false,
    ) {
        Some((r, t)) => g.push(Goal {
            goal: what.into(),
            measured: format!(
                "lowest {:.0}% ({}); {} cases",
                r * 100.0,
                case_of(t),
                cases.len()
            ),
            met: Some(cases.iter().all(|t| t.vs_null.is_some_and(|r| r >= 0.9))),
        }),
        None => g.push(missing(what)),
    }

    let what = "marginal CPU per packet (xesp minus null forwarder) at most 1.5x the raw AEAD, 1400 B, AES-GCM-256";
    let cases: Vec<&Trial> = xesp_cases(trials)
        .filter(|t| t.size == 1400 && t.suite == Suite::Gcm256)
        .filter(|t| t.marginal_vs_raw.is_some())
        .collect();
    match worst(
        cases
            .iter()
            .map(|t| (t.marginal_vs_raw.unwrap_or(f64::NAN), *t)),
        true,
    ) {
        Some((r, t)) => g.push(Goal {
            goal: what.into(),
            measured: format!(
                "highest {r:.2}x ({}: {:.0} ns over {:.0} ns raw); {} cases",
                case_of(t),
                t.marginal_cpu_ns.unwrap_or(f64::NAN),
                t.raw_aead_ns,
                cases.len()
            ),
            met: Some(
                cases
                    .iter()
                    .all(|t| t.marginal_vs_raw.is_some_and(|r| r <= 1.5)),
            ),
        }),
        None => g.push(missing(what)),
    }

    let what = "two workers (two tunnels on two queues): CPU per packet at most 1.1x one worker's";
    let mut scale = Vec::new();
    for one in xesp_cases(trials).filter(|t| t.tunnels == 1) {
        if let Some(two) = xesp_cases(trials).find(|t| {
            t.tunnels == 2
                && t.size == one.size
                && t.suite == one.suite
                && t.direction == one.direction
        }) {
            scale.push((two.cpu() / one.cpu(), two));
        }
    }
    match worst(scale.iter().map(|(r, t)| (*r, *t)), true) {
        Some((r, t)) => g.push(Goal {
            goal: what.into(),
            measured: format!("highest {r:.2}x ({}); {} cases", case_of(t), scale.len()),
            met: Some(scale.iter().all(|(r, _)| *r <= 1.1)),
        }),
        None => g.push(missing(what)),
    }

    let what = "64 B, one tunnel: at least 5x strongSwan libipsec's packets/s";
    let cases: Vec<&Trial> = xesp_cases(trials)
        .filter(|t| t.size == 64 && t.tunnels == 1 && t.vs_strongswan.is_some())
        .collect();
    match worst(
        cases
            .iter()
            .map(|t| (t.vs_strongswan.unwrap_or(f64::NAN), *t)),
        false,
    ) {
        Some((r, t)) => g.push(Goal {
            goal: what.into(),
            measured: format!("lowest {r:.1}x ({}); {} cases", case_of(t), cases.len()),
            met: Some(
                cases
                    .iter()
                    .all(|t| t.vs_strongswan.is_some_and(|r| r >= 5.0)),
            ),
        }),
        None => g.push(missing(what)),
    }
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pps: f64, cpu_ns: Option<u64>, delivered: u64) -> Measured {
        Measured {
            sent: delivered,
            delivered,
            pps,
            offered_pps: pps,
            seconds: 1.0,
            cpu_ns,
            ..Measured::default()
        }
    }

    fn trial(dut: DutKind, size: usize, tunnels: usize, pps: f64, cpu: u64) -> Trial {
        Trial::new(
            dut,
            Suite::Gcm256,
            Direction::Decrypt,
            size,
            tunnels,
            vec![m(pps, Some(cpu * 1000), 1000)],
            100.0,
        )
    }

    #[test]
    fn spreads_are_min_median_max_of_finite_values() {
        let s = Spread::of([3.0, f64::NAN, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert_eq!(Spread::of([1.0, 4.0]).median, 2.5);
        assert!(Spread::of([]).median.is_nan());
        assert_eq!(Spread::of([5.0]).show(0), "5");
        assert_eq!(Spread::of([1.0, 2.0, 3.0]).show(1), "2.0 (1.0–3.0)");
    }

    #[test]
    fn system_calls_per_packet_sum_the_syscall_counters() {
        let mut a = m(1000.0, Some(1), 1000);
        for (k, v) in [
            ("xesp:workers:syscall_tx_kicks", 200),
            ("xesp:workers:syscall_rx_polls", 40),
            ("xesp:workers:syscall_fill_wakeups", 10),
            ("xesp:workers:batches", 9999),
        ] {
            a.counters.insert(k.into(), v);
        }
        let mut b = m(1000.0, Some(1), 500);
        b.counters
            .insert("xesp:workers:syscall_tx_kicks".into(), 50);
        let t = Trial::new(
            DutKind::Xesp,
            Suite::Gcm256,
            Direction::Decrypt,
            64,
            1,
            vec![a, b],
            100.0,
        );
        let s = t.syscalls_per_packet;
        assert_eq!((s.min, s.max), (0.1, 0.25), "batches are no system call");
        let kernel = trial(DutKind::Kernel, 64, 1, 1000.0, 0);
        assert_eq!(
            kernel.syscalls_per_packet.show(3),
            "-",
            "no workers, no figure"
        );
    }

    #[test]
    fn ratios_to_the_baselines_of_the_same_case() {
        let mut t = vec![
            trial(DutKind::Xesp, 1400, 1, 900.0, 500),
            trial(DutKind::Null, 1400, 1, 1000.0, 300),
            trial(DutKind::Kernel, 1400, 1, 2000.0, 0),
            trial(DutKind::StrongSwan, 1400, 1, 100.0, 5000),
            trial(DutKind::Null, 64, 1, 5.0, 1),
        ];
        t[2].suite = Suite::Cbc256Sha1; // kernel forwarding matches whatever transform
        compare(&mut t);
        let x = &t[0];
        assert_eq!(x.vs_null, Some(0.9));
        assert_eq!(x.marginal_cpu_ns, Some(200.0));
        assert_eq!(x.marginal_vs_raw, Some(2.0));
        assert_eq!(x.vs_kernel, Some(0.45));
        assert_eq!(x.vs_strongswan, Some(9.0));
        assert_eq!(
            t[1].vs_null, None,
            "only xesp is compared with the null forwarder"
        );
    }

    #[test]
    fn busy_polled_xesp_is_compared_with_the_busy_polled_null_forwarder() {
        let mut t = vec![
            trial(DutKind::XespBusyPoll, 1400, 1, 800.0, 600),
            trial(DutKind::Null, 1400, 1, 1000.0, 300),
            trial(DutKind::NullBusyPoll, 1400, 1, 400.0, 400),
            trial(DutKind::StrongSwan, 1400, 1, 100.0, 5000),
        ];
        compare(&mut t);
        let x = &t[0];
        assert_eq!(x.vs_null, Some(2.0));
        assert_eq!(x.marginal_cpu_ns, Some(200.0));
        assert_eq!(x.vs_strongswan, None, "strongSwan is xesp's comparison");
        assert_eq!(t[2].vs_null, None);
    }

    #[test]
    fn goals_say_met_and_not_met() {
        let mut t = vec![
            trial(DutKind::Xesp, 1400, 1, 950.0, 400),
            trial(DutKind::Xesp, 1400, 2, 1900.0, 500),
            trial(DutKind::Null, 1400, 1, 1000.0, 300),
            trial(DutKind::Xesp, 64, 1, 600.0, 100),
            trial(DutKind::StrongSwan, 64, 1, 100.0, 1000),
        ];
        compare(&mut t);
        let step = |percent, pps| Step::new(percent, 0.0, vec![m(pps, None, 1)]).unwrap();
        let o = vec![Overload {
            dut: DutKind::Xesp,
            suite: Suite::Gcm256,
            direction: Direction::Decrypt,
            size: 1400,
            flat_out_pps: 900.0,
            steps: vec![step(50, 450.0), step(100, 1000.0), step(200, 800.0)],
        }];
        assert_eq!(o[0].peak(), 1000.0);
        assert_eq!(o[0].at_top(), Some(0.8));
        let g = goals(&t, &o);
        let met: Vec<Option<bool>> = g.iter().map(|g| g.met).collect();
        // overload 80% (no); 95% of null (yes); marginal 100 ns / 100 ns = 1x (yes);
        // two workers 500/400 = 1.25x (no); 6x strongSwan (yes).
        assert_eq!(
            met,
            [Some(false), Some(true), Some(true), Some(false), Some(true)],
            "{g:#?}"
        );
        assert!(g[0].measured.contains("80%"), "{}", g[0].measured);
        assert!(
            goals(&[], &[]).iter().all(|g| g.met.is_none()),
            "nothing measured, nothing met or missed"
        );
    }
}
