//! Logging to stderr: the filter in `FLOWLEDGER_LOG` (tracing-subscriber
//! `EnvFilter` syntax), the format in `FLOWLEDGER_LOG_FORMAT` (`auto`,
//! `text` or `json`; `auto`: text with colours on a terminal, one JSON
//! object per line otherwise, so a file or a log shipper gets no escape
//! codes). A malformed value is an error naming the variable, never
//! silently replaced by the default. With traces on
//! ([`crate::telemetry::Traces`]), the same subscriber also sends
//! flowledger's spans to the OTLP collector, whatever the log filter.

use std::io::IsTerminal;

/// The filter when `FLOWLEDGER_LOG` is not set. vaultrs and rustify (its
/// HTTP layer) log every Vault answer >= 400 at ERROR, the expected 404 of
/// a data subject's first key included; flowledger logs the Vault errors
/// that matter itself, with what it was doing.
pub const DEFAULT_FILTER: &str = "info,async_nats=warn,sqlx=warn,vaultrs=off,rustify=off";

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Human-readable lines; colours only when `ansi`.
    Text {
        /// Colour escape codes (a terminal).
        ansi: bool,
    },
    /// One JSON object per line (`timestamp`, `level`, `target`,
    /// `fields`, `span`).
    Json,
}

/// Why logging could not be set up (exit code 2).
#[derive(Debug, thiserror::Error)]
pub enum LogSetupError {
    /// `FLOWLEDGER_LOG` does not parse.
    #[error("FLOWLEDGER_LOG={value:?} is not a log filter ({source}); use e.g. `info` or `info,flowledger=debug`")]
    Filter {
        /// The variable's value.
        value: String,
        /// The parser's complaint.
        source: tracing_subscriber::filter::ParseError,
    },
    /// `FLOWLEDGER_LOG_FORMAT` is none of the formats.
    #[error("FLOWLEDGER_LOG_FORMAT={0:?} is not a log format: use auto, text or json")]
    Format(String),
}

/// The filter from `value` (the variable's, if set).
pub fn filter(value: Option<&str>) -> Result<tracing_subscriber::EnvFilter, LogSetupError> {
    let Some(value) = value else {
        return Ok(tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    };
    tracing_subscriber::EnvFilter::builder()
        .parse(value)
        .map_err(|source| LogSetupError::Filter {
            value: value.to_string(),
            source,
        })
}

/// The format from `value` (the variable's, if set) for a stderr that is
/// or is not a terminal.
pub fn format(value: Option<&str>, terminal: bool) -> Result<Format, LogSetupError> {
    match value.map(str::trim) {
        None | Some("" | "auto") if terminal => Ok(Format::Text { ansi: true }),
        None | Some("" | "auto") => Ok(Format::Json),
        Some("text") => Ok(Format::Text { ansi: terminal }),
        Some("json") => Ok(Format::Json),
        Some(other) => Err(LogSetupError::Format(other.to_string())),
    }
}

/// The subscriber `serve` and every command run under: log lines to
/// stderr through `filter` in `format`, and, with `traces`, flowledger's
/// spans to the trace exporter (filtered on their own: a quiet log filter
/// does not drop them).
pub fn subscriber(
    filter: tracing_subscriber::EnvFilter,
    format: Format,
    traces: Option<&crate::telemetry::Traces>,
) -> impl tracing::Subscriber + Send + Sync + 'static {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer;
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let lines = match format {
        Format::Text { ansi } => lines.with_ansi(ansi).boxed(),
        Format::Json => lines.json().with_ansi(false).boxed(),
    };
    tracing_subscriber::registry()
        .with(traces.map(|t| t.layer()))
        .with(lines.with_filter(filter))
}

/// Installs the global subscriber from the environment, with `traces`
/// when they are on (see [`subscriber`]).
pub fn init(traces: Option<&crate::telemetry::Traces>) -> Result<(), LogSetupError> {
    use tracing_subscriber::util::SubscriberInitExt;
    let var = |name: &str| std::env::var(name).ok();
    let filter = filter(var("FLOWLEDGER_LOG").as_deref())?;
    let format = format(
        var("FLOWLEDGER_LOG_FORMAT").as_deref(),
        std::io::stderr().is_terminal(),
    )?;
    // a second init (a test that calls `cli::main` twice) keeps the first
    let _ = subscriber(filter, format, traces).try_init();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_filter_or_format_is_an_error_naming_the_variable() {
        assert!(filter(None).is_ok());
        assert!(filter(Some("info,flowledger=debug")).is_ok());
        let e = filter(Some("info,flowledger=loud"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("FLOWLEDGER_LOG=\"info,flowledger=loud\""), "{e}");
        let e = format(Some("xml"), true).unwrap_err().to_string();
        assert!(e.contains("FLOWLEDGER_LOG_FORMAT=\"xml\""), "{e}");
    }

    #[test]
    fn auto_is_text_on_a_terminal_and_json_elsewhere_never_colour_off_a_terminal() {
        assert_eq!(format(None, true).unwrap(), Format::Text { ansi: true });
        assert_eq!(format(None, false).unwrap(), Format::Json);
        assert_eq!(format(Some("auto"), false).unwrap(), Format::Json);
        assert_eq!(
            format(Some("text"), false).unwrap(),
            Format::Text { ansi: false }
        );
        assert_eq!(format(Some("json"), true).unwrap(), Format::Json);
    }
}
