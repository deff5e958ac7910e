//! The Python CLI's text formatting, reproduced exactly: byte sizes,
//! thousands separators, tables and the quantization report.

use squant_io::LayerStats;

/// `format_bytes` of `squant_rs.model.report`.
pub fn format_bytes(n: u64) -> String {
    let mut value = n as f64;
    for unit in ["B", "KiB", "MiB", "GiB"] {
        if value < 1024.0 || unit == "GiB" {
            return if unit == "B" {
                format!("{value:.0} {unit}")
            } else {
                format!("{value:.2} {unit}")
            };
        }
        value /= 1024.0;
    }
    format!("{n} B")
}

/// Python's `f"{n:,}"`.
pub fn commas(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `format_table`: plain-text table lines, columns in `right` right-aligned.
pub fn format_table(headers: &[&str], rows: &[Vec<String>], right: &[usize]) -> Vec<String> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let fmt = |cells: &[String]| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let pad = widths[i].saturating_sub(c.chars().count());
                if right.contains(&i) {
                    format!("{}{c}", " ".repeat(pad))
                } else {
                    format!("{c}{}", " ".repeat(pad))
                }
            })
            .collect();
        parts.join("  ").trim_end().to_string()
    };
    let head: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut out = vec![fmt(&head)];
    out.push(
        widths
            .iter()
            .map(|&w| "-".repeat(w))
            .collect::<Vec<_>>()
            .join("  "),
    );
    out.extend(rows.iter().map(|r| fmt(r)));
    out
}

/// Totals of a report.
pub struct Totals {
    pub params: u64,
    pub total_ms: f64,
    pub mean_rel_error: f64,
    pub k_flips: u64,
    pub c_flips: u64,
}

pub fn totals(layers: &[LayerStats]) -> Totals {
    let params = layers
        .iter()
        .map(|l| l.shape.iter().product::<usize>() as u64)
        .sum();
    let mean_rel_error = if layers.is_empty() {
        0.0
    } else {
        layers.iter().map(|l| l.rel_error).sum::<f64>() / layers.len() as f64
    };
    Totals {
        params,
        total_ms: layers.iter().map(|l| l.time_ms).sum(),
        mean_rel_error,
        k_flips: layers.iter().map(|l| l.k_flips).sum(),
        c_flips: layers.iter().map(|l| l.c_flips).sum(),
    }
}

/// `str(QuantReport)` of an export (no activation columns, nothing skipped).
#[allow(clippy::too_many_arguments)]
pub fn report_table(
    layers: &[LayerStats],
    bits: u32,
    mode: &str,
    quantizer: &str,
    wall_ms: f64,
    size_before: u64,
    size_after: u64,
) -> String {
    let headers = [
        "layer", "shape", "params", "time ms", "rel err", "K flips", "C flips",
    ];
    let rows: Vec<Vec<String>> = layers
        .iter()
        .map(|r| {
            let shape: Vec<String> = r.shape.iter().map(|d| d.to_string()).collect();
            vec![
                if r.name.is_empty() {
                    "(model)".to_string()
                } else {
                    r.name.clone()
                },
                shape.join("x"),
                commas(r.shape.iter().product::<usize>() as u64),
                format!("{:.2}", r.time_ms),
                format!("{:.4}", r.rel_error),
                commas(r.k_flips),
                commas(r.c_flips),
            ]
        })
        .collect();
    let mut lines = format_table(&headers, &rows, &[2, 3, 4, 5, 6]);
    let t = totals(layers);
    let ratio = if size_before > 0 {
        format!("{:.3}", size_after as f64 / size_before as f64)
    } else {
        "nan".to_string()
    };
    // As QuantReport.summary: the quantizer only when not the default.
    let mode = if quantizer == "asymmetric" {
        mode.to_string()
    } else {
        format!("{mode} {quantizer}")
    };
    lines.push(format!(
        "total: {} layers, {} parameters, W{bits} {mode}: {:.1} ms (wall {wall_ms:.1} ms), mean relative error {:.4}, size {} -> {} ({ratio}x)",
        layers.len(),
        commas(t.params),
        t.total_ms,
        t.mean_rel_error,
        format_bytes(size_before),
        format_bytes(size_after),
    ));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_python() {
        assert_eq!(format_bytes(512), "512 B");
        assert_eq!(format_bytes(1536), "1.50 KiB");
        assert_eq!(format_bytes(3 << 30), "3.00 GiB");
        assert_eq!(commas(0), "0");
        assert_eq!(commas(1234567), "1,234,567");
        assert_eq!(commas(123), "123");
        let t = format_table(&["a", "bb"], &[vec!["xyz".into(), "1".into()]], &[1]);
        assert_eq!(t, ["a    bb", "---  --", "xyz   1"]);
    }
}
