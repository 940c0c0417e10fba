//! How a data command prints its answer: `--output json|jsonl|table`.
//! Default: a table on a terminal, JSON otherwise (a script reads JSON).

use std::io::IsTerminal;

use clap::{Args, ValueEnum};
use serde_json::Value;

use super::write_out;

/// The output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum Format {
    /// One pretty-printed JSON document.
    Json,
    /// One JSON object a line (a list's items, a watch's changes).
    Jsonl,
    /// Aligned columns for people.
    Table,
}

/// `--output`, for every command whose output is data.
#[derive(Args, Debug, Clone, Default)]
pub(crate) struct OutputArgs {
    /// How to print the answer: json (one pretty document), jsonl (one
    /// object a line: a list's items) or table (aligned columns); default
    /// table on a terminal, json otherwise.
    #[arg(long, value_enum, env = "FLOWLEDGER_OUTPUT")]
    pub(crate) output: Option<Format>,
}

impl OutputArgs {
    /// The format asked for, or the default for where stdout goes.
    pub(crate) fn format(&self) -> Format {
        self.output.unwrap_or_else(|| {
            if std::io::stdout().is_terminal() {
                Format::Table
            } else {
                Format::Json
            }
        })
    }
}

fn line(s: &str) {
    write_out(format_args!("{s}"));
}

/// Prints `v` as one pretty JSON document.
pub(crate) fn pretty(v: &Value) {
    line(&serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string()));
}

/// Prints `v` as one JSON line.
pub(crate) fn compact(v: &Value) {
    line(&v.to_string());
}

/// Prints a list answer (`{items, next_cursor}` or an array): json the
/// whole answer, jsonl one item a line, table `columns` of each item (a
/// next page's cursor said after it).
pub(crate) fn list(format: Format, answer: &Value, columns: &[&str]) {
    let items: &[Value] = match answer {
        Value::Array(a) => a,
        other => other["items"].as_array().map_or(&[], Vec::as_slice),
    };
    match format {
        Format::Json => pretty(answer),
        Format::Jsonl => items.iter().for_each(compact),
        Format::Table => {
            let rows = items
                .iter()
                .map(|item| columns.iter().map(|c| cell(&item[*c])).collect())
                .collect();
            line(&table(columns, rows));
            if let Some(next) = answer.get("next_cursor").and_then(Value::as_str) {
                line(&format!("(more: next cursor {next})"));
            }
        }
    }
}

/// Prints one object: json pretty, jsonl one line, table one row per
/// field (`field  value`).
pub(crate) fn object(format: Format, v: &Value) {
    match format {
        Format::Json => pretty(v),
        Format::Jsonl => compact(v),
        Format::Table => {
            let rows = match v {
                Value::Object(m) => m.iter().map(|(k, v)| vec![k.clone(), cell(v)]).collect(),
                other => vec![vec!["value".to_string(), cell(other)]],
            };
            line(&table(&["field", "value"], rows));
        }
    }
}

/// A value as a table cell: a string as it is, null as `-`, anything else
/// as compact JSON; control characters (a newline, an escape) become
/// spaces, so a row stays one line and a value cannot drive the terminal.
pub(crate) fn cell(v: &Value) -> String {
    let s = match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// Aligned columns: a header, then the rows, each column as wide as its
/// widest cell, two spaces apart, the last column unpadded.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let render = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut out = String::new();
        for (i, (c, w)) in cells.into_iter().zip(&widths).enumerate() {
            if i == last {
                out.push_str(&c);
            } else {
                let pad = w.saturating_sub(c.chars().count());
                out.push_str(&c);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.trim_end().to_string()
    };
    let mut lines = vec![render(headers.iter().map(|h| h.to_uppercase()).collect())];
    lines.extend(rows.into_iter().map(render));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn columns_align_on_the_widest_cell_and_cells_stay_one_line() {
        let t = table(
            &["id", "status", "note"],
            vec![
                vec!["j-1".into(), "completed".into(), "x".into()],
                vec![
                    "job-long-id".into(),
                    "ok".into(),
                    cell(&json!("a\nb\u{1b}[31m")),
                ],
            ],
        );
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3, "{t}");
        assert_eq!(lines[0], "ID           STATUS     NOTE");
        assert_eq!(lines[1], "j-1          completed  x");
        assert_eq!(lines[2], "job-long-id  ok         a b [31m");
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!({"a": 1})), "{\"a\":1}");
    }
}
