//! OpenTelemetry traces over OTLP/HTTP (protobuf), off unless `[telemetry]
//! otlp_endpoint` (or `OTEL_EXPORTER_OTLP_ENDPOINT`) is set: then `serve`
//! adds a `tracing-opentelemetry` layer to its subscriber
//! ([`crate::logging::subscriber`]) whose spans a batch exporter sends to
//! the collector, and flushes them when it stops.
//!
//! One job is one trace: the `intake` span of the HTTP request or NATS
//! command (a child of the client's W3C `traceparent`, when it sends a
//! valid one), the `commit` span of each append, the `handler` span of the
//! job's driver and one `step_call` span per attempt, whose HTTP call
//! carries `traceparent` to the peer. Between the intake and the handler
//! the context travels in the `traceparent` NATS header of the commit's
//! message, never in its hash-chained body (docs/EVENTS.md section 2).
//!
//! Span attributes are ids and outcomes only (job id, workflow key, step,
//! attempt, status): never inputs, outputs, tokens or URLs.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::TelemetrySection;

/// The W3C trace-context header, in HTTP requests and in NATS messages.
pub const TRACEPARENT: &str = "traceparent";

/// The longest `traceparent` value read (the version-00 form is 55
/// characters; later versions may append fields).
const MAX_TRACEPARENT_LEN: usize = 512;

/// Why the trace exporter could not start (exit code 2: fix the
/// configuration).
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error(
        "cannot start the OTLP trace exporter for {endpoint}: {reason} (check [telemetry] \
         otlp_endpoint or OTEL_EXPORTER_OTLP_ENDPOINT)"
    )]
    Exporter {
        /// The traces URL, redacted.
        endpoint: String,
        /// The exporter's complaint.
        reason: String,
    },
}

/// The running trace pipeline: its provider batches the spans and exports
/// them from its own thread.
pub struct Traces {
    provider: SdkTracerProvider,
    /// Where the spans go (redacted), for the log.
    endpoint: String,
}

impl Traces {
    /// Starts the exporter `section` asks for; `Ok(None)` without an
    /// endpoint (no exporter, no thread, no cost).
    pub fn start(section: &TelemetrySection) -> Result<Option<Traces>, TelemetryError> {
        let Some(url) = section.traces_url() else {
            return Ok(None);
        };
        let endpoint = crate::commands::redact::display(&url);
        // the exporter's client is reqwest on rustls with the ring provider
        crate::handlers::install_tls_provider();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .build()
            .map_err(|e| TelemetryError::Exporter {
                endpoint: endpoint.clone(),
                reason: e.to_string(),
            })?;
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(section.service_name().to_string())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(resource)
            .build();
        Ok(Some(Traces { provider, endpoint }))
    }

    /// Where the spans are sent (without credentials).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The layer that turns flowledger's spans (target `flowledger`, level
    /// info and above) into OpenTelemetry spans; other crates' spans and
    /// every event (log line) stay out of the traces.
    pub fn layer<S>(&self) -> impl Layer<S> + Send + Sync + 'static
    where
        S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync + 'static,
    {
        let tracer = self.provider.tracer("flowledger");
        let ours = tracing_subscriber::filter::filter_fn(|m| {
            m.is_span()
                && *m.level() <= tracing::Level::INFO
                && (m.target() == "flowledger" || m.target().starts_with("flowledger::"))
        });
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(ours)
    }

    /// Exports the spans still batched and stops the exporter (at most
    /// its timeout); a failure is logged, the stop goes on.
    pub async fn shutdown(self) {
        let provider = self.provider;
        // the provider blocks until its thread has exported: not on a
        // runtime thread
        let done = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, endpoint = %self.endpoint, "the last spans could not be exported")
            }
            Err(e) => tracing::warn!(error = %e, "the trace exporter's shutdown did not finish"),
        }
    }
}

/// The `traceparent` header of a NATS message (a command, a commit of the
/// log), if it has one.
pub fn header_of(headers: Option<&async_nats::HeaderMap>) -> Option<String> {
    headers?.get(TRACEPARENT).map(|v| v.as_str().to_string())
}

/// The span of one command at a door (`http` or `nats`) named
/// `<aggregate_type>.<command>`; `job_id` is recorded once known.
pub fn intake_span(door: &'static str, command: &str) -> tracing::Span {
    tracing::info_span!("intake", door, command, job_id = tracing::field::Empty)
}

/// One header value as an OpenTelemetry extractor.
struct Single<'a>(&'a str);

impl Extractor for Single<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        key.eq_ignore_ascii_case(TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// The remote parent a `traceparent` value names, when it is a valid W3C
/// trace context (version, 32-hex trace id and 16-hex span id not all
/// zero, flags); anything else (absent, malformed, too long, not UTF-8 at
/// the caller) is ignored: `None`, never an error.
pub fn remote_parent(traceparent: Option<&str>) -> Option<opentelemetry::Context> {
    let value = traceparent?.trim();
    if value.is_empty() || value.len() > MAX_TRACEPARENT_LEN {
        return None;
    }
    // the fields' exact widths (the SDK's parser takes shorter ids);
    // a later version may append fields, which the propagator judges
    let fields: Vec<&str> = value.split('-').collect();
    let widths_hold = fields.len() >= 4
        && fields
            .iter()
            .zip([2, 32, 16, 2])
            .all(|(f, n)| is_lower_hex(f, n));
    if !widths_hold {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&Single(value));
    cx.span().span_context().is_valid().then_some(cx)
}

/// Whether `value` is a `traceparent` as flowledger writes one (W3C
/// version `00`: `00-<32 hex>-<16 hex>-<2 hex>`, lowercase, ids not all
/// zero): the only form a verifier lets through on a commit.
pub fn is_written_form(value: &str) -> bool {
    let parts: Vec<&str> = value.split('-').collect();
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    matches!(parts.as_slice(), [v, t, s, f]
        if *v == "00" && is_lower_hex(t, 32) && is_lower_hex(s, 16) && is_lower_hex(f, 2)
            && nonzero(t) && nonzero(s))
}

/// `s` is `n` lowercase hex digits.
fn is_lower_hex(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Makes `span` (not yet entered) a child of the `traceparent` a client
/// or a stored message carries; an invalid or absent one changes nothing
/// (the span starts a trace of its own when traces are on).
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(cx) = remote_parent(traceparent) {
        // without the layer (traces off) there is nothing to set
        let _ = span.set_parent(cx);
    }
}

/// The `traceparent` naming `span`, to send onwards (a peer call, a
/// commit's NATS header); `None` when traces are off or the span is not
/// recorded.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut fields = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut fields);
    fields.remove(TRACEPARENT)
}

/// Names `span`'s trace span `name` once it is known (an HTTP request's
/// route after routing); without traces nothing happens.
pub fn rename(span: &tracing::Span, name: String) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        cx.span().update_name(name);
    }
}

/// The `traceparent` of the current span (see [`traceparent`]).
pub fn current_traceparent() -> Option<String> {
    traceparent(&tracing::Span::current())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_names_its_trace_and_span() {
        let cx = remote_parent(Some(GOOD)).expect("a valid traceparent");
        let sc = cx.span().span_context().clone();
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(sc.span_id().to_string(), "00f067aa0ba902b7");
        assert!(sc.is_remote() && sc.is_sampled());
        // surrounding blanks are no reason to drop it
        assert!(remote_parent(Some(&format!("  {GOOD} "))).is_some());
    }

    #[test]
    fn a_bad_traceparent_is_ignored_never_a_panic() {
        let long = format!("{GOOD}-{}", "a".repeat(MAX_TRACEPARENT_LEN));
        for bad in [
            "",
            "garbage",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // all-zero trace id, all-zero span id
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // not hex, wrong lengths, the forbidden version ff
            "00-4bf92f3577b34da6a3ce929d0e0e473z-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
            "ü-ñ-ï-ç",
            "---",
            &long,
        ] {
            assert!(remote_parent(Some(bad)).is_none(), "{bad:?}");
        }
        assert!(remote_parent(None).is_none());
    }

    #[test]
    fn only_the_written_form_passes_a_verifier() {
        assert!(is_written_form(GOOD));
        for bad in [
            "",
            &GOOD.to_uppercase(),
            &format!("{GOOD}-00"),
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert!(!is_written_form(bad), "{bad:?}");
        }
    }

    #[test]
    fn without_traces_no_span_has_a_traceparent_and_adopting_changes_nothing() {
        // no OpenTelemetry layer in this test's subscriber
        let span = tracing::info_span!("intake");
        adopt(&span, Some(GOOD));
        assert_eq!(traceparent(&span), None);
        assert_eq!(current_traceparent(), None);
    }

    #[test]
    fn with_traces_a_span_continues_a_valid_parent_and_names_itself_onwards() {
        use tracing_subscriber::layer::SubscriberExt;
        // nothing listens there: the few spans are dropped at the end
        let on = TelemetrySection {
            otlp_endpoint: Some("http://127.0.0.1:9".into()),
            service_name: None,
        };
        let traces = Traces::start(&on).expect("starts").expect("an exporter");
        assert_eq!(traces.endpoint(), "http://127.0.0.1:9/v1/traces");
        let subscriber = tracing_subscriber::registry().with(traces.layer());
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("intake");
            adopt(&span, Some(GOOD));
            let tp = traceparent(&span).expect("a recorded span names itself");
            assert!(is_written_form(&tp), "{tp}");
            let parts: Vec<&str> = tp.split('-').collect();
            assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_ne!(
                parts[2], "00f067aa0ba902b7",
                "its own span id, not the parent's"
            );
            // a child inherits the trace
            let child = span.in_scope(|| {
                let c = tracing::info_span!("commit");
                traceparent(&c).expect("a child names itself")
            });
            assert!(
                child.contains("4bf92f3577b34da6a3ce929d0e0e4736"),
                "{child}"
            );
            // a bad header starts a trace of its own
            let other = tracing::info_span!("intake");
            adopt(&other, Some("00-zz-yy-01"));
            let own = traceparent(&other).expect("a root names itself");
            assert!(!own.contains("4bf92f3577b34da6a3ce929d0e0e4736"), "{own}");
            // debug spans and other crates' spans are not traced
            let quiet = tracing::debug_span!("detail");
            assert_eq!(traceparent(&quiet), None);
        });
    }

    #[test]
    fn no_endpoint_starts_no_exporter() {
        let off = TelemetrySection::default();
        assert!(Traces::start(&off).expect("no error").is_none());
    }
}
