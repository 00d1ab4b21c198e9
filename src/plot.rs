//! Learning curves as PNG: accuracy (train and test) and loss per epoch, one
//! colour per history, drawn with plotters and labelled with an embedded font.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use coordinator::History;
use plotters::prelude::*;

const FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
const SIZE: (u32, u32) = (1200, 480);
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is embedded and known to parse; a failure only loses labels.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Reads a history JSON written by `--history`.
pub fn read_history(path: &Path) -> Result<History> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&bytes)
        .with_context(|| format!("{}: not a gradcast/Keras history JSON", path.display()))
}

/// Draws `histories` (label, history) into a PNG at `out`.
pub fn plot(histories: &[(String, History)], out: &Path) -> Result<()> {
    if histories.iter().all(|(_, h)| h.loss.is_empty()) {
        bail!("nothing to plot: the histories have no epochs");
    }
    register_font();
    let mut pixels = vec![255u8; (SIZE.0 * SIZE.1 * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let (left, right) = root.split_horizontally(SIZE.0 / 2);
        let epochs = histories
            .iter()
            .map(|(_, h)| h.loss.len())
            .max()
            .unwrap_or(1)
            .max(2);
        panel(&left, "accuracy", histories, epochs, |h| {
            (&h.accuracy, &h.val_accuracy)
        })?;
        panel(&right, "loss", histories, epochs, |h| {
            (&h.loss, &h.val_loss)
        })?;
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    image::save_buffer(out, &pixels, SIZE.0, SIZE.1, image::ExtendedColorType::Rgb8)
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

type Series<'a> = (&'a Vec<f64>, &'a Vec<f64>);

fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    what: &str,
    histories: &[(String, History)],
    epochs: usize,
    pick: impl Fn(&History) -> Series<'_>,
) -> Result<()> {
    let values = histories.iter().flat_map(|(_, h)| {
        let (a, b) = pick(h);
        a.iter().chain(b.iter()).copied().filter(|v| v.is_finite())
    });
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (0.0, 1.0) };
    let pad = ((hi - lo) * 0.05).max(1e-3);
    let y = if what == "accuracy" {
        (lo - pad).max(0.0)..(hi + pad).min(1.0)
    } else {
        (lo - pad).max(0.0)..hi + pad
    };
    let mut chart = ChartBuilder::on(area)
        .caption(format!("model {what}"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(1f64..epochs as f64, y)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .x_labels(epochs.min(20))
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc(what)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (i, (label, h)) in histories.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let (train, test) = pick(h);
        for (series, kind, style) in [
            (train, "train", color.stroke_width(2)),
            (test, "test", color.mix(0.55).stroke_width(2)),
        ] {
            let points: Vec<(f64, f64)> = series
                .iter()
                .enumerate()
                .map(|(e, &v)| ((e + 1) as f64, v))
                .collect();
            let name = if label.is_empty() {
                kind.to_string()
            } else {
                format!("{label} {kind}")
            };
            let markers = kind == "test";
            chart
                .draw_series(LineSeries::new(points.clone(), style))
                .map_err(|e| anyhow!("{e}"))?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            if markers {
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, style.filled())))
                    .map_err(|e| anyhow!("{e}"))?;
            }
        }
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .label_font(("sans-serif", 14))
        .position(if what == "loss" {
            SeriesLabelPosition::UpperRight
        } else {
            SeriesLabelPosition::LowerRight
        })
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}
