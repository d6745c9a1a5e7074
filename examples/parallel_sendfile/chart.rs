//! The table as a picture: throughput (GB/s) of every mode, one bar per
//! working set (inside the caches, beyond them) side by side, each bar
//! labelled with its figure and its ratio to kernel sendfile. An SVG
//! written beside the CSV, drawn with plotters.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use crate::report::Row;

/// Bar colours, one per working set in the order the rows give them.
const COLOURS: [RGBColor; 4] = [RGBColor(0x35, 0x6a, 0xb0), RGBColor(0xd9, 0x7a, 0x2b), GREEN, MAGENTA];

/// Names in first-seen order, each once.
fn unique<'a>(names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut out: Vec<&str> = Vec::new();
    for n in names {
        if !out.contains(&n) {
            out.push(n);
        }
    }
    out
}

/// Draw `rows` into an SVG file at `path`; `note` goes under the bars
/// (what the working sets are).
pub fn svg(rows: &[Row], path: &Path, note: &str) -> Result<(), String> {
    draw(rows, path, note).map_err(|e| format!("{}: {e}", path.display()))
}

fn draw(rows: &[Row], path: &Path, note: &str) -> Result<(), Box<dyn std::error::Error>> {
    let modes = unique(rows.iter().map(|r| r.mode.as_str()));
    let sets = unique(rows.iter().map(|r| r.set.as_str()));
    let top = rows.iter().map(|r| r.gbps).fold(0.0, f64::max).max(0.01) * 1.2;
    let n = modes.len().max(1);
    let root = SVGBackend::new(path, (140 * n as u32 + 160, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("parallel_sendfile: throughput by mode and working set", ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(64)
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, 0f64..top)?;
    let label = |x: &f64| {
        let i = x.round();
        if (x - i).abs() < 1e-6 && i >= 0.0 {
            modes.get(i as usize).map_or_else(String::new, |m| m.to_string())
        } else {
            String::new()
        }
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&label)
        .x_desc(note)
        .y_desc("GB/s (body bytes received by the clients)")
        .label_style(("sans-serif", 14))
        .draw()?;
    let width = 0.8 / sets.len().max(1) as f64;
    for (k, set) in sets.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let bars: Vec<(f64, &Row)> = rows
            .iter()
            .filter(|r| r.set == *set)
            .filter_map(|r| modes.iter().position(|m| *m == r.mode).map(|i| (i as f64 - 0.4 + k as f64 * width, r)))
            .collect();
        chart
            .draw_series(bars.iter().map(|&(x, r)| Rectangle::new([(x, 0.0), (x + width, r.gbps)], colour.filled())))?
            .label(match *set {
                "inside" => "inside the caches",
                "beyond" => "beyond the caches",
                other => other,
            })
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 12, y + 6)], colour.filled()));
        chart.draw_series(bars.iter().map(|&(x, r)| {
            let text = match r.vs_sendfile {
                Some(v) => format!("{:.2} ({v:.2}x)", r.gbps),
                None => format!("{:.2}", r.gbps),
            };
            let style = ("sans-serif", 11).into_font().color(&BLACK).pos(Pos::new(HPos::Center, VPos::Bottom));
            Text::new(text, (x + width / 2.0, r.gbps + top * 0.005), style)
        }))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.85))
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_every_mode_and_set() {
        let row = |set: &str, mode: &str, gbps: f64| Row {
            set: set.into(),
            mode: mode.into(),
            gbps,
            vs_sendfile: Some(gbps / 1.5),
            ..Row::default()
        };
        let rows = vec![
            row("inside", "sendfile", 1.5),
            row("inside", "lwbuf", 1.2),
            row("beyond", "sendfile", 1.4),
            row("beyond", "lwbuf", 0.1),
        ];
        let path = std::env::temp_dir().join(format!("parallel_sendfile-chart-{}.svg", std::process::id()));
        svg(&rows, &path, "inside: 32 MiB; beyond: 256 MiB").expect("draw");
        let text = std::fs::read_to_string(&path).expect("svg");
        std::fs::remove_file(&path).ok();
        assert!(text.starts_with("<svg"), "{}", &text[..text.len().min(100)]);
        for s in [
            "sendfile",
            "lwbuf",
            "inside the caches",
            "beyond the caches",
            "1.20 (0.80x)",
            "inside: 32 MiB; beyond: 256 MiB",
        ] {
            assert!(text.contains(s), "the chart shows {s:?}");
        }
        // Four bars (and the two legend swatches).
        let fills = text.matches("fill=\"#356AB0\"").count() + text.matches("fill=\"#D97A2B\"").count();
        assert_eq!(fills, 6, "{text}");
    }
}
