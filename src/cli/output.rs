//! Output formatting: `--format table|json|csv` and the rows behind it.

use std::io::Write;

use anyhow::Result;
use breakglass::text;
use clap::ValueEnum;

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub(super) enum Format {
    Table,
    Json,
    Csv,
}

pub(super) fn print_rows(format: Format, headers: &[&str], rows: &[Vec<String>]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        Format::Csv => {
            write!(out, "{}", breakglass::csv::line(headers))?;
            for r in rows {
                write!(out, "{}", breakglass::csv::line(r))?;
            }
        }
        Format::Json => {
            let v: Vec<serde_json::Map<String, serde_json::Value>> = rows
                .iter()
                .map(|r| {
                    headers
                        .iter()
                        .zip(r)
                        .map(|(h, v)| (h.to_string(), serde_json::Value::String(v.clone())))
                        .collect()
                })
                .collect();
            writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        }
        Format::Table => {
            // A table is read in a terminal: stored text shows its control characters as
            // escapes (CSV and JSON carry the values unchanged, quoted for their format).
            let rows: Vec<Vec<String>> = rows
                .iter()
                .map(|r| r.iter().map(|f| text::terminal(f).into_owned()).collect())
                .collect();
            let rows = &rows;
            let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
            for r in rows {
                for (i, f) in r.iter().enumerate() {
                    if let Some(w) = widths.get_mut(i) {
                        *w = (*w).max(f.chars().count());
                    }
                }
            }
            let line = |fields: Vec<String>| -> String {
                fields
                    .iter()
                    .enumerate()
                    .map(|(i, f)| format!("{f:<w$}", w = widths.get(i).copied().unwrap_or(0)))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_string()
            };
            writeln!(
                out,
                "{}",
                line(headers.iter().map(|h| h.to_uppercase()).collect())
            )?;
            for r in rows {
                writeln!(out, "{}", line(r.clone()))?;
            }
            if rows.is_empty() {
                writeln!(out, "(none)")?;
            }
        }
    }
    Ok(())
}

/// Formats an optional float for tables and CSV (empty when there is no value).
pub(super) fn opt_f64(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.1}")).unwrap_or_default()
}
