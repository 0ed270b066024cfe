//! tidegate's upstream HTTP/1.1 client (`proxy::h1`) against hyper's, on
//! generated answers: valid ones of every framing, and ones with a byte
//! changed where framing lives. Both must refuse an answer or read it to
//! the same status, fields, body and trailers (`checks::upstream_response`,
//! the fuzz target's check; its corpus runs in `fuzz_corpus.rs`).

#[path = "../../../fuzz/src/lib.rs"]
#[allow(unreachable_pub, dead_code)]
mod checks;

mod generate;

use generate::chunked;
use proptest::prelude::*;

fn status_line() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![
            "HTTP/1.1", "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "http/1.1",
        ]),
        prop::sample::select(vec![
            "200", "200", "201", "204", "304", "404", "500", "099", "2000",
        ]),
        prop::sample::select(vec![" OK", " ", "", " Not Found", " caf\u{e9}"]),
    )
        .prop_map(|(version, code, reason)| format!("{version} {code}{reason}").into_bytes())
}

/// A field line; the first three are written with the body's length.
#[derive(Debug, Clone)]
enum Field {
    Length,
    LengthTwice,
    LengthOf(u64),
    Line(String),
}

impl Field {
    fn line(&self, len: usize) -> String {
        match self {
            Field::Length => format!("content-length: {len}"),
            Field::LengthTwice => format!("Content-Length: {len}, {len}"),
            Field::LengthOf(n) => format!("content-length: {n}"),
            Field::Line(line) => line.clone(),
        }
    }
}

fn field() -> impl Strategy<Value = Field> {
    let lines = |lines: Vec<&'static str>| {
        prop::sample::select(lines).prop_map(|line| Field::Line(line.to_owned()))
    };
    prop_oneof![
        4 => Just(Field::Length),
        1 => Just(Field::LengthTwice),
        1 => (0u64..40).prop_map(Field::LengthOf),
        1 => lines(vec![
            "content-length: -1", "content-length: 1 2", "content-length:",
            "content-length: 18446744073709551616",
        ]),
        3 => lines(vec![
            "transfer-encoding: chunked", "Transfer-Encoding: CHUNKED",
            "transfer-encoding: gzip, chunked", "transfer-encoding: chunked, gzip",
            "transfer-encoding: identity", "transfer-encoding:  chunked ",
        ]),
        2 => lines(vec![
            "connection: close", "connection: keep-alive", "Connection: Keep-Alive, close",
            "trailer: x-sum", "set-cookie: a=1", "x-empty:", "x-tab: a\tb", "x-obs: caf\u{e9}",
            "date: Sat, 05 Dec 2026 22:00:00 GMT",
        ]),
        1 => ("[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,12}", "[ -~]{0,16}")
            .prop_map(|(n, v)| Field::Line(format!("{n}: {v}"))),
    ]
}

fn answer() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::option::weighted(0.15, Just(b"HTTP/1.1 100 Continue\r\n\r\n".to_vec())),
        status_line(),
        prop::collection::vec(field(), 0..5),
        prop_oneof![prop::collection::vec(any::<u8>(), 0..40), chunked()],
        prop::option::weighted(
            0.3,
            (
                any::<prop::sample::Index>(),
                prop::sample::select(b"\r\n :;0aAfZ\t\x00\x7f\xff".to_vec()),
            ),
        ),
    )
        .prop_map(|(informational, status, fields, body, change)| {
            let mut answer = informational.unwrap_or_default();
            answer.extend_from_slice(&status);
            answer.extend_from_slice(b"\r\n");
            for field in fields {
                answer.extend_from_slice(field.line(body.len()).as_bytes());
                answer.extend_from_slice(b"\r\n");
            }
            answer.extend_from_slice(b"\r\n");
            answer.extend_from_slice(&body);
            if let Some((at, byte)) = change {
                let at = at.index(answer.len());
                answer[at] = byte;
            }
            answer
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tidegate_reads_upstream_answers_as_hyper_does(method in any::<u8>(), answer in answer()) {
        let mut data = vec![method];
        data.extend_from_slice(&answer);
        checks::upstream_response(&data);
    }
}
