//! The report's chart, drawn with `plotters` (bitmap backend, text with
//! ab_glyph and the DejaVu Sans font of Debian's fonts-dejavu-core): packets/s
//! delivered per case on a log scale, one bar per device measured.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::{
    prelude::*,
    style::{FontStyle, register_font},
};

use super::{Direction, Suite, dut::DutKind, report::Trial};

/// The font the chart's text is drawn in.
pub const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers [`FONT`] once as plotters' "sans-serif".
fn font() -> Result<()> {
    static DONE: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = std::fs::read(FONT).map_err(|e| format!("reading {FONT}: {e}"))?;
        // The registry keeps the font for the rest of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{FONT} is not a font plotters can read"))
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

fn colour(kind: DutKind) -> RGBColor {
    match kind {
        DutKind::Xesp => RGBColor(30, 80, 160),
        DutKind::Null => RGBColor(120, 120, 120),
        DutKind::XespBusyPoll => RGBColor(110, 160, 230),
        DutKind::NullBusyPoll => RGBColor(190, 190, 190),
        DutKind::Kernel => RGBColor(60, 150, 60),
        DutKind::StrongSwan => RGBColor(220, 130, 40),
    }
}

/// A case's short label: G/C (transform), E/D (direction), size, tunnels.
fn case_label(t: &Trial) -> String {
    format!(
        "{}{} {} {}t",
        if t.suite == Suite::Gcm256 { "G" } else { "C" },
        if t.direction == Direction::Encrypt {
            "E"
        } else {
            "D"
        },
        t.size,
        t.tunnels
    )
}

/// The cases on the x axis: every xesp case, or every case of the first
/// device measured when xesp was not.
fn cases(trials: &[Trial]) -> Vec<&Trial> {
    let lead = trials
        .iter()
        .find(|t| t.dut == DutKind::Xesp)
        .or(trials.first())
        .map(|t| t.dut);
    trials.iter().filter(|t| Some(t.dut) == lead).collect()
}

/// Draws the chart into `path` (PNG).
pub fn draw(trials: &[Trial], path: &Path) -> Result<()> {
    font()?;
    let cases = cases(trials);
    let kinds: Vec<DutKind> = DutKind::ALL
        .into_iter()
        .filter(|k| trials.iter().any(|t| t.dut == *k))
        .collect();
    let width = (140 + cases.len() * (kinds.len() * 9 + 14)).max(900) as u32;
    let root = BitMapBackend::new(path, (width, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let n = cases.len().max(1) as f64;
    let (lo, hi) = (1e3f64, 1e9f64);
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Delivered packets/s per case (log scale), every device in the same run",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(70)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n, (lo..hi).log_scale())
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_desc("case (labels at the top): G AES-GCM-256 / C AES-CBC-256+SHA1-96, E encrypt / D decrypt, inner packet size in octets, tunnels")
        .y_desc("delivered packets/s")
        .y_label_formatter(&|y| format!("{y:.0e}"))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let w = 0.8 / kinds.len().max(1) as f64;
    for (j, &kind) in kinds.iter().enumerate() {
        let bars: Vec<Rectangle<(f64, f64)>> = cases
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                let t = trials.iter().find(|t| {
                    t.dut == kind
                        && (t.suite == c.suite || !kind.has_suite())
                        && t.direction == c.direction
                        && t.size == c.size
                        && t.tunnels == c.tunnels
                })?;
                let x = i as f64 + 0.1 + j as f64 * w;
                let y = t.pps.median.clamp(lo, hi);
                Some(Rectangle::new(
                    [(x, lo), (x + w * 0.9, y)],
                    colour(kind).filled(),
                ))
            })
            .collect();
        chart
            .draw_series(bars)
            .map_err(|e| anyhow!("{e}"))?
            .label(kind.label())
            .legend(move |(x, y)| {
                Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour(kind).filled())
            });
    }
    // Each case's label, rotated, at the top of its group of bars.
    let style = ("sans-serif", 12)
        .into_font()
        .transform(FontTransform::Rotate90)
        .color(&BLACK);
    chart
        .draw_series(
            cases
                .iter()
                .enumerate()
                .map(|(i, t)| Text::new(case_label(t), (i as f64 + 0.35, hi / 1.5), style.clone())),
        )
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Measured;

    #[test]
    fn draws_a_png_with_every_device() {
        if !Path::new(FONT).exists() {
            // `cargo xtask setup` installs it (fonts-dejavu-core).
            panic!("{FONT} is missing: run cargo xtask setup");
        }
        let mut trials = Vec::new();
        for (k, pps) in [
            (DutKind::Xesp, 5e5),
            (DutKind::Null, 6e5),
            (DutKind::Kernel, 9e5),
            (DutKind::StrongSwan, 1e5),
        ] {
            for size in [64, 1400] {
                trials.push(Trial::new(
                    k,
                    Suite::Gcm256,
                    Direction::Decrypt,
                    size,
                    1,
                    vec![Measured {
                        pps,
                        ..Measured::default()
                    }],
                    100.0,
                ));
            }
        }
        let dir = std::env::temp_dir().join(format!("xesp-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let png = dir.join("t.png");
        draw(&trials, &png).unwrap();
        let bytes = std::fs::read(&png).unwrap();
        if let Some(keep) = std::env::var_os("XESP_KEEP_CHART") {
            std::fs::copy(&png, keep).unwrap();
        }
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        assert!(
            bytes.len() > 2000,
            "{} octets: an empty picture?",
            bytes.len()
        );
        assert_eq!(cases(&trials).len(), 2, "xesp's cases on the x axis");
    }
}
