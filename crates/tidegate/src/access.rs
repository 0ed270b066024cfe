//! Access lines (`tidegate::access` events) written by a layer of their
//! own, in the same text and JSON forms as tracing-subscriber's `fmt`
//! layer writes every other line: one line per request is the one log
//! line on the data path, and `fmt`'s generic field visitor (each value
//! through `Debug` and `core::fmt`) cost ~15 000 instructions a request,
//! as much as the rest of the request's own work. This one writes the
//! fields it knows into a reused buffer and the line with one `write`.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use tidegate_gateway::proxy::{AccessLog, AccessRecord};
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

/// The target of access lines (see `tidegate_gateway::proxy`).
pub(crate) const ACCESS: &str = "tidegate::access";

/// Writes access events to stderr in batches (or to `sink`, line by
/// line, in tests).
pub(crate) struct AccessLayer<W = fn() -> std::io::Stderr> {
    json: bool,
    time: bool,
    sink: W,
    batches: Option<&'static Batches>,
}

impl AccessLayer {
    /// Lines to stderr, as JSON objects or as text, in batches (see
    /// [`Batches`]).
    pub(crate) fn stderr(json: bool) -> Self {
        AccessLayer {
            json,
            time: true,
            sink: std::io::stderr,
            batches: Some(stderr_batches()),
        }
    }
}

/// How long an access line waits to be written at most.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// The bytes of lines a thread gathers before it writes them itself.
const BATCH: usize = 32 * 1024;

/// Access lines gathered per thread and written in batches, whole lines
/// only: every [`FLUSH_EVERY`] by a thread of their own, by the thread
/// itself once it has [`BATCH`] bytes waiting, and at exit
/// ([`flush`]). One `write` per line cost the worker more than the rest
/// of the line; Envoy writes its access logs the same way (every second),
/// nginx with `access_log … buffer= flush=`.
pub(crate) struct Batches {
    /// Every thread's buffer, for the flushes.
    buffers: Mutex<Vec<Arc<Mutex<Vec<u8>>>>>,
    /// Held from taking a batch to writing it: a thread's batches are
    /// written in the order they were taken.
    writing: Mutex<()>,
    write: Write,
}

/// Where batches go.
type Write = Box<dyn Fn(&[u8]) + Send + Sync>;

impl Batches {
    fn new(write: Write) -> Self {
        Batches {
            buffers: Mutex::new(Vec::new()),
            writing: Mutex::new(()),
            write,
        }
    }

    /// Adds `line` to this thread's batch; writes the batch when full.
    fn push(&self, mine: &Arc<Mutex<Vec<u8>>>, line: &[u8]) {
        let full = {
            let mut batch = lock(mine);
            batch.extend_from_slice(line);
            batch.len() >= BATCH
        };
        if full {
            self.write_out(mine);
        }
    }

    /// Takes what `buffer` holds and writes it, after any batch taken
    /// before.
    fn write_out(&self, buffer: &Mutex<Vec<u8>>) {
        let _writing = lock(&self.writing);
        let waiting = {
            let mut batch = lock(buffer);
            if batch.is_empty() {
                return;
            }
            std::mem::replace(&mut *batch, Vec::with_capacity(BATCH + 1024))
        };
        (self.write)(&waiting);
    }

    /// A new buffer for a thread, known to the flushes.
    fn register(&self) -> Arc<Mutex<Vec<u8>>> {
        let mine = Arc::new(Mutex::new(Vec::with_capacity(BATCH + 1024)));
        lock(&self.buffers).push(mine.clone());
        mine
    }

    /// Writes every thread's waiting lines.
    fn flush(&self) {
        let buffers = lock(&self.buffers).clone();
        for buffer in buffers {
            self.write_out(&buffer);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The batches of stderr's access lines, and the thread that flushes
/// them, started on first use.
fn stderr_batches() -> &'static Batches {
    STDERR_BATCHES.get_or_init(|| {
        let _ = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(|| loop {
                std::thread::sleep(FLUSH_EVERY);
                stderr_batches().flush();
            });
        Batches::new(Box::new(|bytes| {
            let _ = std::io::Write::write_all(&mut std::io::stderr(), bytes);
        }))
    })
}

static STDERR_BATCHES: OnceLock<Batches> = OnceLock::new();

/// Writes the access lines still waiting (at exit).
pub(crate) fn flush() {
    if let Some(batches) = STDERR_BATCHES.get() {
        batches.flush();
    }
}

impl<W, O> AccessLayer<W>
where
    W: Fn() -> O,
    O: std::io::Write,
{
    #[cfg(test)]
    fn to(sink: W, json: bool, time: bool) -> Self {
        AccessLayer {
            json,
            time,
            sink,
            batches: None,
        }
    }

    /// The line of `event`, ending in a newline, into `out`.
    fn format(&self, event: &Event<'_>, out: &mut String) {
        let level = event.metadata().level();
        let mut fields = self.begin(*level, out);
        event.record(&mut fields);
        self.end(event.metadata().target(), out);
    }

    /// The line of `record`: the same text as its event's.
    fn format_record(&self, record: &AccessRecord<'_>, out: &mut String) {
        // Each field's name with its separator, both forms spelled out
        // at compile time: one push each rather than three.
        macro_rules! key {
            ($fields:expr, $name:literal) => {
                $fields.key(concat!(" ", $name, "="), concat!(",\"", $name, "\":"))
            };
        }
        let mut fields = self.begin(tracing::Level::INFO, out);
        key!(fields, "request_id");
        fields.quoted(record.request_id);
        // Written as `Display` writes it, as `method = %…` is.
        key!(fields, "method");
        if fields.json {
            fields.quoted(record.method);
        } else {
            fields.out.push_str(record.method);
        }
        key!(fields, "route");
        fields.quoted(record.route);
        key!(fields, "upstream");
        fields.quoted(record.upstream);
        key!(fields, "attempts");
        padded(fields.out, u64::from(record.attempts), 1);
        key!(fields, "status");
        padded(fields.out, u64::from(record.status), 1);
        // Whole microseconds: the thousandths a float of them would show.
        key!(fields, "duration_ms");
        write_thousandths(fields.out, record.duration_us);
        key!(fields, "ttfb_ms");
        write_thousandths(fields.out, record.ttfb_us);
        key!(fields, "complete");
        fields
            .out
            .push_str(if record.complete { "true" } else { "false" });
        // An absent value is no field, as `tracing` records `None`.
        if let Some(id) = record.api_key_id {
            key!(fields, "api_key_id");
            fields.quoted(id);
        }
        if let Some(fallback) = record.fallback {
            key!(fields, "fallback");
            fields.quoted(fallback);
        }
        self.end(ACCESS, out);
    }

    /// What comes before a line's fields; the fields' writer.
    fn begin<'a>(&self, level: tracing::Level, out: &'a mut String) -> Fields<'a> {
        if self.json {
            out.push('{');
            if self.time {
                out.push_str("\"timestamp\":\"");
                timestamp(out);
                out.push_str("\",");
            }
            let _ = write!(out, "\"level\":\"{level}\",\"fields\":{{");
        } else {
            if self.time {
                timestamp(out);
                out.push(' ');
            }
            if level == tracing::Level::INFO {
                out.push_str(" INFO tidegate::access: ");
            } else {
                let _ = write!(out, "{level:>5} {ACCESS}: ");
            }
        }
        Fields {
            out,
            json: self.json,
            first: true,
        }
    }

    /// What comes after a line's fields, and its newline.
    fn end(&self, target: &str, out: &mut String) {
        if self.json {
            out.push_str("},\"target\":\"");
            out.push_str(target);
            out.push_str("\"}\n");
        } else {
            out.push('\n');
        }
    }

    /// Fills a line (a reused buffer per thread) and writes it, or adds
    /// it to the thread's batch.
    fn emit(&self, fill: impl FnOnce(&mut String)) {
        thread_local! {
            static LINE: RefCell<String> = RefCell::new(String::with_capacity(512));
            static BATCH: RefCell<Option<Arc<Mutex<Vec<u8>>>>> = const { RefCell::new(None) };
        }
        LINE.with(|line| {
            let Ok(mut line) = line.try_borrow_mut() else {
                return;
            };
            line.clear();
            fill(&mut line);
            match self.batches {
                Some(batches) => BATCH.with(|mine| {
                    let mut mine = mine.borrow_mut();
                    let mine = mine.get_or_insert_with(|| batches.register());
                    batches.push(mine, line.as_bytes());
                }),
                None => {
                    let _ = (self.sink)().write_all(line.as_bytes());
                }
            }
        });
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
        self.emit(|line| self.format(event, line));
    }
}

impl<W, O> AccessLog for AccessLayer<W>
where
    W: Fn() -> O + Send + Sync,
    O: std::io::Write,
{
    fn write(&self, record: &AccessRecord<'_>) {
        self.emit(|line| self.format_record(record, line));
    }
}

/// Now as `fmt`'s `SystemTime` timer writes it: RFC 3339, UTC,
/// microseconds.
fn timestamp(out: &mut String) {
    let micros = tidegate_client::clock::unix_micros();
    second(out, micros / 1_000_000);
    padded(out, micros % 1_000_000, 6);
    out.push('Z');
}

/// A second's part of a timestamp, up to its `.`: written once a second
/// (per thread), copied the rest of it.
fn second(out: &mut String, secs: u64) {
    thread_local! {
        static LAST: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != secs {
            let (days, rest) = (secs / 86_400, secs % 86_400);
            let (year, month, day) = tidegate_client::clock::civil_from_days(days as i64);
            let (year, month, day) = (year as u64, u64::from(month), u64::from(day));
            let text = &mut last.1;
            text.clear();
            for (value, width, after) in [
                (year, 4, '-'),
                (month, 2, '-'),
                (day, 2, 'T'),
                (rest / 3600, 2, ':'),
                (rest / 60 % 60, 2, ':'),
                (rest % 60, 2, '.'),
            ] {
                padded(text, value, width);
                text.push(after);
            }
            last.0 = secs;
        }
        out.push_str(&last.1);
    });
}

/// `value` in decimal, at least `width` digits (zeros in front).
fn padded(out: &mut String, value: u64, width: usize) {
    // The digits after as many zeros as the width asks for, pushed at once.
    let mut text = [b'0'; 40];
    let count = tidegate_client::headers::write_digits(value, &mut text[20..]);
    let start = 20 - width.min(20).saturating_sub(count);
    out.push_str(std::str::from_utf8(&text[start..20 + count]).unwrap_or_default());
}

/// Whether `text` reads the same quoted by `Debug` and by JSON as between
/// plain quotes: printable ASCII without `"` or `\`.
fn plain(text: &str) -> bool {
    // Eight bytes at a time: none below 0x20, none from 0x7f, no quote or
    // backslash (each test exact for "is there such a byte").
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let has_zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH != 0;
    let mut words = text.as_bytes().chunks_exact(8);
    for word in &mut words {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let control = x.wrapping_sub(ONES * 0x20) & !x & HIGH != 0;
        let high = (x.wrapping_add(ONES) | x) & HIGH != 0;
        if control
            || high
            || has_zero(x ^ (ONES * u64::from(b'"')))
            || has_zero(x ^ (ONES * u64::from(b'\\')))
        {
            return false;
        }
    }
    words
        .remainder()
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
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
    fn name(&mut self, name: &str) {
        if !std::mem::replace(&mut self.first, false) {
            self.out.push(if self.json { ',' } else { ' ' });
        }
        if self.json {
            self.out.push('"');
            self.out.push_str(name);
            self.out.push_str("\":");
        } else {
            self.out.push_str(name);
            self.out.push('=');
        }
    }

    /// A field's name given whole with the separator before it, in
    /// text (` name=`) and in JSON (`,"name":`); the first field's goes
    /// without it.
    fn key(&mut self, text: &'static str, json: &'static str) {
        let key = if self.json { json } else { text };
        let key = match std::mem::replace(&mut self.first, false) {
            true => &key[1..],
            false => key,
        };
        self.out.push_str(key);
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
        self.name(field.name());
        self.quoted(value);
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field.name());
        padded(self.out, value, 1);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field.name());
        let _ = write!(self.out, "{value}");
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field.name());
        self.out.push_str(if value { "true" } else { "false" });
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.name(field.name());
        self.float(value);
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.name(field.name());
        if self.json {
            self.quoted(&format!("{value:?}"));
        } else {
            let _ = write!(self.out, "{value:?}");
        }
    }
}

impl Fields<'_> {
    /// A float as `fmt` writes it: `Debug` in text, a JSON number.
    fn float(&mut self, value: f64) {
        // A whole number of thousandths (the access line's durations) has
        // one shortest form, its decimal digits, which `Debug` and JSON
        // both write; digits cost a tenth of finding it in general.
        let thousandths = (value.abs() * 1000.0).round();
        if value == 0.0
            || ((1e-3..1e12).contains(&value.abs()) && thousandths / 1000.0 == value.abs())
        {
            if value.is_sign_negative() {
                self.out.push('-');
            }
            write_thousandths(self.out, thousandths as u64);
            return;
        }
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
}

/// `n` thousandths as a decimal with at least one fractional digit and
/// no trailing zero after it: `12.5`, `0.001`, `3.0`.
fn write_thousandths(out: &mut String, n: u64) {
    let mut digits = [0u8; 24];
    let whole = tidegate_client::headers::write_digits(n / 1000, &mut digits);
    digits[whole] = b'.';
    let fraction = n % 1000;
    let shown = match fraction {
        0 => 1,
        f if f % 100 == 0 => 1,
        f if f % 10 == 0 => 2,
        _ => 3,
    };
    let tail = [
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
    ];
    digits[whole + 1..whole + 1 + shown].copy_from_slice(&tail[..shown]);
    out.push_str(std::str::from_utf8(&digits[..whole + 1 + shown]).unwrap_or_default());
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::prelude::*;

    use super::*;

    /// Text lines write a float as `Debug` does and JSON lines as
    /// serde_json does, whichever way they get there: milliseconds of
    /// every size, and the bounds around them.
    #[test]
    fn floats_read_as_debug_writes_them() {
        let mut values = vec![
            0.0, -0.0, 1e-3, 0.000999, 1e15, 9.99e14, 1e16, 1e-5, 5.0, 12.5, 0.0425,
        ];
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let nanos = x % 100_000_000_000;
            values.push(std::time::Duration::from_nanos(nanos).as_secs_f64() * 1000.0);
            values.push((nanos / 1000) as f64 / 1000.0);
            values.push(f64::from_bits(x) % 1e6);
        }
        for value in values.into_iter().filter(|v| v.is_finite()) {
            let mut out = String::new();
            Fields {
                out: &mut out,
                json: false,
                first: true,
            }
            .float(value);
            assert_eq!(out, format!("{value:?}"));
            // And as JSON numbers, as serde_json writes them.
            let mut out = String::new();
            Fields {
                out: &mut out,
                json: true,
                first: true,
            }
            .float(value);
            let json =
                serde_json::Number::from_f64(value).map_or("null".to_owned(), |n| n.to_string());
            assert_eq!(out, json, "{value:?}");
        }
    }

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
                ttfb_ms = 0.043f64,
                complete = false,
                api_key_id = key,
                fallback = fallback,
            );
        }
        tracing::info!(target: "tidegate::other", note = "not an access line");
    }

    /// The records of `emit`'s events.
    fn records() -> [AccessRecord<'static>; 2] {
        let record = |request_id, api_key_id, fallback| AccessRecord {
            request_id,
            method: "GET",
            route: "api",
            upstream: "svc",
            attempts: 2,
            status: 503,
            duration_us: 12_500,
            ttfb_us: 43,
            complete: false,
            api_key_id,
            fallback,
        };
        [
            record("4bf92f35", Some("team-a"), None),
            record("with \"quotes\" and \\ and é", None, Some("static")),
        ]
    }

    #[test]
    fn a_record_written_directly_reads_as_its_event() {
        for json in [false, true] {
            let (direct, evented) = (Sink::default(), Sink::default());
            let writer = direct.clone();
            let layer = AccessLayer::to(move || writer.clone(), json, false);
            for record in records() {
                AccessLog::write(&layer, &record);
            }
            let writer = evented.clone();
            let subscriber = tracing_subscriber::registry().with(AccessLayer::to(
                move || writer.clone(),
                json,
                false,
            ));
            tracing::subscriber::with_default(subscriber, emit);
            assert_eq!(direct.text(), evented.text());
            assert_eq!(direct.text().lines().count(), 2);
        }
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
        for (secs, text) in [
            (0, "1970-01-01T00:00:00."),
            (951_782_400, "2000-02-29T00:00:00."),
            (1_796_482_447, "2026-12-05T14:54:07."),
            // The same second again: the kept text.
            (1_796_482_447, "2026-12-05T14:54:07."),
        ] {
            let mut out = String::new();
            second(&mut out, secs);
            assert_eq!(out, text);
        }
        let mut out = String::new();
        timestamp(&mut out);
        assert_eq!(out.len(), "2026-12-05T21:27:53.123456Z".len(), "{out}");
        assert!(out.ends_with('Z') && out.as_bytes()[10] == b'T', "{out}");
    }
}

#[cfg(test)]
mod batch_tests {
    use super::*;

    #[test]
    fn plain_text_is_told_eight_bytes_at_a_time_as_byte_by_byte() {
        let bytewise = |t: &[u8]| {
            t.iter()
                .all(|&b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
        };
        for len in [0, 7, 8, 9, 16, 17, 23] {
            for at in 0..len {
                for byte in 0u8..0x80 {
                    let mut text = vec![b'a'; len];
                    text[at] = byte;
                    // Beside a byte whose carry or borrow could mislead.
                    if at + 1 < len {
                        text[at + 1] = b'~';
                    }
                    let text = String::from_utf8(text).expect("ASCII");
                    assert_eq!(plain(&text), bytewise(text.as_bytes()), "{text:?}");
                }
            }
        }
        assert!(!plain("0123456789abcdé"));
        assert!(plain("0123456789abcdef-0123"));
    }

    #[test]
    fn batched_lines_are_written_whole_when_full_or_flushed() {
        let written = Arc::new(Mutex::new(Vec::<Vec<u8>>::new()));
        let sink = written.clone();
        let batches: &'static Batches = Box::leak(Box::new(Batches::new(Box::new(move |b| {
            lock(&sink).push(b.to_vec());
        }))));
        let line = format!("{}\n", "x".repeat(99));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let line = line.clone();
                std::thread::spawn(move || {
                    let mine = batches.register();
                    for _ in 0..1000 {
                        batches.push(&mine, line.as_bytes());
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().expect("a writer");
        }
        // Full batches went as they filled; the rest waits for a flush.
        let before: usize = lock(&written).iter().map(Vec::len).sum();
        assert!((2 * BATCH..200_000).contains(&before), "{before}");
        batches.flush();
        let writes = lock(&written);
        assert_eq!(writes.iter().map(Vec::len).sum::<usize>(), 200_000);
        assert!(
            writes.iter().all(|w| w.len() % 100 == 0),
            "whole lines only"
        );
        drop(writes);
        batches.flush();
        assert_eq!(lock(&written).iter().map(Vec::len).sum::<usize>(), 200_000);
    }
}
