//! Access lines (`tidegate::access` events) written by a layer of their
//! own, in the same text and JSON forms as tracing-subscriber's `fmt`
//! layer writes every other line: one line per request is the one log
//! line on the data path, and `fmt`'s generic field visitor (each value
//! through `Debug` and `core::fmt`) cost ~15 000 instructions a request,
//! as much as the rest of the request's own work. This one writes the
//! fields it knows into a reused buffer and the line with one `write`.

use std::cell::RefCell;
use std::fmt::Write as _;

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// The target of access lines (see `tidegate_gateway::proxy`).
pub(crate) const ACCESS: &str = "tidegate::access";

/// Writes access events to stderr (or `sink`, in tests).
pub(crate) struct AccessLayer<W = fn() -> std::io::Stderr> {
    json: bool,
    time: bool,
    sink: W,
}

impl AccessLayer {
    /// Lines to stderr, as JSON objects or as text.
    pub(crate) fn stderr(json: bool) -> Self {
        AccessLayer {
            json,
            time: true,
            sink: std::io::stderr,
        }
    }
}

impl<W, O> AccessLayer<W>
where
    W: Fn() -> O,
    O: std::io::Write,
{
    #[cfg(test)]
    fn to(sink: W, json: bool, time: bool) -> Self {
        AccessLayer { json, time, sink }
    }

    /// The line of `event`, ending in a newline, into `out`.
    fn format(&self, event: &Event<'_>, out: &mut String) {
        let level = event.metadata().level();
        if self.json {
            out.push('{');
            if self.time {
                out.push_str("\"timestamp\":\"");
                timestamp(out);
                out.push_str("\",");
            }
            let _ = write!(out, "\"level\":\"{level}\",\"fields\":{{");
            event.record(&mut Fields {
                out,
                json: true,
                first: true,
            });
            out.push_str("},\"target\":\"");
            out.push_str(event.metadata().target());
            out.push_str("\"}\n");
        } else {
            if self.time {
                timestamp(out);
                out.push(' ');
            }
            let _ = write!(out, "{level:>5} {}: ", event.metadata().target());
            event.record(&mut Fields {
                out,
                json: false,
                first: true,
            });
            out.push('\n');
        }
    }
}

impl<S, W, O> Layer<S> for AccessLayer<W>
where
    S: Subscriber,
    W: Fn() -> O + 'static,
    O: std::io::Write,
{
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != ACCESS {
            return;
        }
        thread_local! {
            static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            self.format(event, &mut line);
            let _ = (self.sink)().write_all(line.as_bytes());
        });
    }
}

/// Now as `fmt`'s `SystemTime` timer writes it: RFC 3339, UTC,
/// microseconds.
fn timestamp(out: &mut String) {
    let micros = tidegate_client::clock::unix_micros();
    let (secs, micros) = (micros / 1_000_000, micros % 1_000_000);
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil(days);
    for (value, width, after) in [
        (year, 4, '-'),
        (month, 2, '-'),
        (day, 2, 'T'),
        (rest / 3600, 2, ':'),
        (rest / 60 % 60, 2, ':'),
        (rest % 60, 2, '.'),
        (micros, 6, 'Z'),
    ] {
        padded(out, value, width);
        out.push(after);
    }
}

/// `value` in decimal, at least `width` digits (zeros in front).
fn padded(out: &mut String, value: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut at = digits.len();
    let mut rest = value;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    let start = at.min(digits.len() - width.min(digits.len()));
    out.push_str(std::str::from_utf8(&digits[start..]).expect("ASCII digits"));
}

/// The date of a day counted from 1970-01-01 (Howard Hinnant's
/// `civil_from_days`).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Whether `text` reads the same quoted by `Debug` and by JSON as between
/// plain quotes: printable ASCII without `"` or `\`.
fn plain(text: &str) -> bool {
    text.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// The fields of a line as `fmt` writes them: `name=value` separated by
/// spaces (strings quoted as `Debug` quotes them, other values as `Debug`
/// writes them), or JSON's `"name":value` separated by commas.
struct Fields<'a> {
    out: &'a mut String,
    json: bool,
    first: bool,
}

impl Fields<'_> {
    fn name(&mut self, field: &Field) {
        if !std::mem::replace(&mut self.first, false) {
            self.out.push(if self.json { ',' } else { ' ' });
        }
        if self.json {
            self.out.push('"');
            self.out.push_str(field.name());
            self.out.push_str("\":");
        } else {
            self.out.push_str(field.name());
            self.out.push('=');
        }
    }

    /// A string, quoted as `Debug` (text) or JSON quotes it.
    fn quoted(&mut self, value: &str) {
        if plain(value) {
            self.out.push('"');
            self.out.push_str(value);
            self.out.push('"');
        } else if self.json {
            self.out
                .push_str(&serde_json::to_string(value).unwrap_or_default());
        } else {
            let _ = write!(self.out, "{value:?}");
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.name(field);
        self.quoted(value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        padded(self.out, value, 1);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        let _ = write!(self.out, "{value}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.name(field);
        match (self.json, serde_json::Number::from_f64(value)) {
            (false, _) => {
                let _ = write!(self.out, "{value:?}");
            }
            (true, Some(n)) => {
                let _ = write!(self.out, "{n}");
            }
            (true, None) => self.out.push_str("null"),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.name(field);
        if self.json {
            self.quoted(&format!("{value:?}"));
        } else {
            let _ = write!(self.out, "{value:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::prelude::*;

    use super::*;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Sink {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Sink {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    /// Access events with every kind of value, odd strings included.
    fn emit() {
        let method = http::Method::GET;
        for (id, key, fallback) in [
            ("4bf92f35", Some("team-a"), None),
            ("with \"quotes\" and \\ and é", None, Some("static")),
        ] {
            tracing::info!(
                target: ACCESS,
                request_id = id,
                method = %method,
                route = "api",
                upstream = "svc",
                attempts = 2u32,
                status = 503u16,
                duration_ms = 12.5f64,
                ttfb_ms = 0.0425f64,
                complete = false,
                api_key_id = key,
                fallback = fallback,
            );
        }
        tracing::info!(target: "tidegate::other", note = "not an access line");
    }

    #[test]
    fn lines_are_what_the_fmt_layer_writes() {
        for json in [false, true] {
            let (ours, theirs) = (Sink::default(), Sink::default());
            let mine = ours.clone();
            let fmt = theirs.clone();
            let access = tracing_subscriber::filter::filter_fn(|m| m.target() == ACCESS);
            let layer = tracing_subscriber::fmt::layer()
                .with_writer(move || fmt.clone())
                .with_ansi(false)
                .without_time();
            let subscriber = tracing_subscriber::registry().with(AccessLayer::to(
                move || mine.clone(),
                json,
                false,
            ));
            let subscriber = if json {
                subscriber.with(layer.json().with_filter(access).boxed())
            } else {
                subscriber.with(layer.with_filter(access).boxed())
            };
            tracing::subscriber::with_default(subscriber, emit);
            let (ours, theirs) = (ours.text(), theirs.text());
            assert_eq!(ours.lines().count(), 2, "{ours}");
            if json {
                for (a, b) in ours.lines().zip(theirs.lines()) {
                    let a: serde_json::Value = serde_json::from_str(a).unwrap();
                    let b: serde_json::Value = serde_json::from_str(b).unwrap();
                    assert_eq!(a, b);
                }
            } else {
                assert_eq!(ours, theirs);
            }
        }
    }

    #[test]
    fn numbers_are_padded_to_their_width() {
        for (value, width, text) in [
            (0, 1, "0"),
            (7, 2, "07"),
            (2026, 4, "2026"),
            (42, 6, "000042"),
            (u64::MAX, 1, "18446744073709551615"),
        ] {
            let mut out = String::new();
            padded(&mut out, value, width);
            assert_eq!(out, text);
        }
    }

    #[test]
    fn timestamps_are_rfc3339_in_utc_with_microseconds() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(11_016), (2000, 2, 29));
        assert_eq!(civil(20_792), (2026, 12, 5));
        let mut out = String::new();
        timestamp(&mut out);
        assert_eq!(out.len(), "2026-12-05T21:27:53.123456Z".len(), "{out}");
        assert!(out.ends_with('Z') && out.as_bytes()[10] == b'T', "{out}");
    }
}
