//! Line plots of training curves.

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

use crate::error::{Error, Result};

/// One named curve of (x, y) points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Draw `series` as lines into a PNG at `path`.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::Plot {
        path: path.into(),
        msg: e.to_string(),
    };
    let pts = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.0.is_finite() && p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        return Err(err(&"nothing to plot"));
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    // a sweep of a few points is not clipped at the edges
    if series.iter().all(|s| s.points.len() <= 20) {
        let xpad = (x1 - x0) * 0.04;
        x0 -= xpad;
        x1 += xpad;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-3);
    let root = BitMapBackend::new(path, (900, 560)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))
        .map_err(|e| err(&e))?;
    let compact = |v: &f64| {
        if v.abs() >= 1e5 {
            format!("{v:.1e}")
        } else {
            // at most four decimals, without trailing zeros
            let s = format!("{v:.4}");
            let s = s.trim_end_matches('0').trim_end_matches('.');
            if s == "-0" {
                "0".to_string()
            } else {
                s.to_string()
            }
        }
    };
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .x_label_formatter(&compact)
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .copied()
            .filter(|p| p.0.is_finite() && p.1.is_finite())
            .collect();
        // a few points (a sweep, a lone reference) are marked too
        if pts.len() <= 20 {
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A heat map of `values[row][col]` (e.g. layers × experts load) with a colour scale from
/// white (0) to dark blue (the maximum).
pub fn heatmap(
    path: &Path,
    title: &str,
    row_label: &str,
    col_label: &str,
    rows: &[String],
    values: &[Vec<f64>],
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::Plot {
        path: path.into(),
        msg: e.to_string(),
    };
    let n_cols = values.iter().map(|r| r.len()).max().unwrap_or(0);
    if values.is_empty() || n_cols == 0 {
        return Err(err(&"nothing to plot"));
    }
    let max = values
        .iter()
        .flatten()
        .copied()
        .fold(0f64, f64::max)
        .max(1e-12);
    let height = (120 + 40 * values.len()).min(1200) as u32;
    let root = BitMapBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(90)
        .build_cartesian_2d(0..n_cols, 0..values.len())
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(col_label)
        .y_desc(row_label)
        .x_labels(n_cols.min(32))
        .y_labels(values.len())
        .y_label_formatter(&|y| rows.get(*y).cloned().unwrap_or_default())
        .draw()
        .map_err(|e| err(&e))?;
    chart
        .draw_series(values.iter().enumerate().flat_map(|(r, row)| {
            row.iter().enumerate().map(move |(c, &v)| {
                let t = v / max;
                let shade = |lo: f64, hi: f64| (lo + (hi - lo) * t) as u8;
                let color = RGBColor(shade(255.0, 8.0), shade(255.0, 48.0), shade(255.0, 107.0));
                Rectangle::new([(c, r), (c + 1, r + 1)], color.filled())
            })
        }))
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

/// A routing map: one row of cells per routed block (`values[row][token]`, shaded by value,
/// 1 darkest) and each token's text under its column, so a reader sees which tokens were
/// chosen. Long texts wrap into strips of 48 tokens. Whitespace is drawn visibly (␣ ⏎ ⇥).
pub fn routing_map(
    path: &Path,
    title: &str,
    rows: &[String],
    values: &[Vec<f64>],
    pieces: &[String],
) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::Plot {
        path: path.into(),
        msg: e.to_string(),
    };
    let n_cols = pieces.len();
    if values.is_empty() || n_cols == 0 || values.iter().any(|r| r.len() != n_cols) {
        return Err(err(&format!(
            "a routing map needs one value per token in every row ({n_cols} tokens)"
        )));
    }
    let shown: Vec<String> = pieces
        .iter()
        .map(|p| {
            let s: String = p
                .chars()
                .map(|c| match c {
                    ' ' => '␣',
                    '\n' => '⏎',
                    '\t' => '⇥',
                    c if c.is_control() => '·',
                    c => c,
                })
                .take(12)
                .collect();
            if s.is_empty() {
                "∅".into()
            } else {
                s
            }
        })
        .collect();
    let per = n_cols.min(48);
    let strips = n_cols.div_ceil(per);
    let (left, top, width) = (100i32, 44i32, 1200i32);
    let cell_w = (width - left - 10) / per as i32;
    let cell_h = 18i32;
    let widest = shown.iter().map(|s| s.chars().count()).max().unwrap_or(1) as i32;
    // one-character tokens (bytes) stand upright under their column; longer ones turn
    let upright = widest <= 1;
    let label_h = if upright { 22 } else { 12 + 9 * widest };
    let strip_h = values.len() as i32 * cell_h + label_h + 18;
    let height = top + strips as i32 * strip_h + 10;
    let root = BitMapBackend::new(path, (width as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let font = |size: f64| ("sans-serif", size).into_font().color(&BLACK);
    root.draw(&Text::new(title.to_string(), (left, 12), font(20.0)))
        .map_err(|e| err(&e))?;
    for s in 0..strips {
        let y0 = top + s as i32 * strip_h;
        let cols = s * per..((s + 1) * per).min(n_cols);
        for (r, (name, row)) in rows.iter().zip(values).enumerate() {
            let y = y0 + r as i32 * cell_h;
            root.draw(&Text::new(name.clone(), (8, y + 2), font(13.0)))
                .map_err(|e| err(&e))?;
            for (j, c) in cols.clone().enumerate() {
                let t = row[c].clamp(0.0, 1.0);
                let shade = |lo: f64, hi: f64| (lo + (hi - lo) * t) as u8;
                let color = RGBColor(shade(238.0, 8.0), shade(238.0, 48.0), shade(238.0, 107.0));
                let x = left + j as i32 * cell_w;
                root.draw(&Rectangle::new(
                    [(x, y), (x + cell_w - 2, y + cell_h - 2)],
                    color.filled(),
                ))
                .map_err(|e| err(&e))?;
            }
        }
        let y = y0 + rows.len() as i32 * cell_h + 2;
        for (j, c) in cols.enumerate() {
            let x = left + j as i32 * cell_w + cell_w / 2;
            let style = if upright {
                font(14.0).pos(Pos::new(HPos::Center, VPos::Top))
            } else {
                font(13.0)
                    .transform(FontTransform::Rotate90)
                    .pos(Pos::new(HPos::Left, VPos::Center))
            };
            root.draw(&Text::new(shown[c].clone(), (x, y), style))
                .map_err(|e| err(&e))?;
        }
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
