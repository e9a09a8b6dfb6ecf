//! Line plots of training curves.

use plotters::prelude::*;
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
            format!("{v}")
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
