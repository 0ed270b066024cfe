//! tidegate's HTTP/1.1 server (`http::h1`) against hyper's, on generated
//! connections: a few requests in a row, valid ones of every framing and
//! ones with a byte changed where framing lives. Both must read the same
//! requests, and tidegate may stop earlier only at framing hyper forgives
//! (`checks::client_requests`, the fuzz target's check; its corpus runs
//! in `fuzz_corpus.rs`).

#[path = "../../../fuzz/src/lib.rs"]
#[allow(unreachable_pub, dead_code)]
mod checks;

mod generate;

use generate::chunked;
use proptest::prelude::*;

/// Mostly the valid choices, sometimes one of the others.
fn mostly(
    valid: Vec<&'static str>,
    other: Vec<&'static str>,
) -> impl Strategy<Value = &'static str> {
    prop_oneof![
        12 => prop::sample::select(valid),
        1 => prop::sample::select(other),
    ]
}

fn request_line() -> impl Strategy<Value = String> {
    (
        mostly(
            vec![
                "GET", "GET", "POST", "POST", "PUT", "HEAD", "OPTIONS", "DELETE", "PATCH",
            ],
            vec!["G_T", "get", "", "G\u{e9}T"],
        ),
        mostly(
            vec!["/", "/a/b?c=d", "/%41", "//x", "http://example.com/x", "*"],
            vec!["/caf\u{e9}", "/a b", "example.com:443", ""],
        ),
        mostly(
            vec!["HTTP/1.1", "HTTP/1.1", "HTTP/1.0"],
            vec!["HTTP/2.0", "HTTP/1.2", "http/1.1"],
        ),
    )
        .prop_map(|(method, target, version)| format!("{method} {target} {version}"))
}

/// A field line; the first two are written with the body's length.
#[derive(Debug, Clone)]
enum Field {
    Length,
    LengthOf(u64),
    Line(&'static str),
    Any(String),
}

impl Field {
    fn line(&self, len: usize) -> String {
        match self {
            Field::Length => format!("Content-Length: {len}"),
            Field::LengthOf(n) => format!("content-length: {n}"),
            Field::Line(line) => (*line).to_owned(),
            Field::Any(line) => line.clone(),
        }
    }
}

fn field() -> impl Strategy<Value = Field> {
    let lines = |lines: Vec<&'static str>| prop::sample::select(lines).prop_map(Field::Line);
    prop_oneof![
        3 => Just(Field::Length),
        1 => (0u64..40).prop_map(Field::LengthOf),
        1 => lines(vec![
            "content-length: -1", "content-length: 1 2", "content-length:", "content-length: +3",
            "content-length: 18446744073709551616", "Content-Length: 3, 3",
        ]),
        2 => lines(vec![
            "transfer-encoding: chunked", "Transfer-Encoding: CHUNKED",
            "transfer-encoding: gzip, chunked", "transfer-encoding:  chunked ",
        ]),
        1 => lines(vec!["transfer-encoding: chunked, gzip", "transfer-encoding: identity"]),
        8 => lines(vec![
            "Host: example.com", "host: a:80", "connection: close", "connection: keep-alive",
            "Connection: Keep-Alive, close", "expect: 100-continue", "upgrade: websocket",
            "te: trailers", "trailer: x-sum", "cookie: a=1", "x-empty:", "x-tab: a\tb",
            "x-obs: caf\u{e9}", "x-tidegate-client-identity: forged",
        ]),
        1 => lines(vec!["X Y: z", "x : y", " folded", "x\u{1}: y"]),
        2 => ("[a-zA-Z0-9!#$%&'*+.^_`|~-]{1,12}", "[ -~]{0,16}")
            .prop_map(|(n, v)| Field::Any(format!("{n}: {v}"))),
    ]
}

fn request() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::option::weighted(0.05, Just("\r\n")),
        request_line(),
        prop::collection::vec(field(), 0..4),
        prop_oneof![
            2 => Just(Vec::new()),
            2 => prop::collection::vec(any::<u8>(), 0..40),
            2 => chunked()
        ],
    )
        .prop_map(|(blank, line, fields, body)| {
            let mut request = blank.unwrap_or_default().as_bytes().to_vec();
            request.extend_from_slice(line.as_bytes());
            request.extend_from_slice(b"\r\n");
            for field in fields {
                request.extend_from_slice(field.line(body.len()).as_bytes());
                request.extend_from_slice(b"\r\n");
            }
            request.extend_from_slice(b"\r\n");
            request.extend_from_slice(&body);
            request
        })
}

fn connection() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(request(), 1..4),
        prop::option::weighted(
            0.2,
            (
                any::<prop::sample::Index>(),
                prop::sample::select(b"\r\n :;0aAfZ\t\x00\x7f\xff".to_vec()),
            ),
        ),
    )
        .prop_map(|(requests, change)| {
            let mut data = requests.concat();
            if let Some((at, byte)) = change {
                let at = at.index(data.len());
                data[at] = byte;
            }
            data
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn tidegate_reads_client_requests_as_hyper_does(data in connection()) {
        checks::client_requests(&data);
    }
}
