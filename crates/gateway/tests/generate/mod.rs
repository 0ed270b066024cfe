//! Generators the differential tests of the two HTTP/1.1 codecs share.

use proptest::prelude::*;

/// A chunked body: chunks, each with its size written one way or another,
/// and a trailer section.
pub(crate) fn chunked() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(
            (
                prop::collection::vec(any::<u8>(), 1..20),
                prop::sample::select(vec!["", ";ext", ";a=b;c=\"d\"", " ", "\t ;x"]),
                any::<bool>(),
            ),
            0..4,
        ),
        prop::collection::vec(
            prop::sample::select(vec!["x-sum: 1", "Expires: 0", "bad trailer", "x-e:"]),
            0..3,
        ),
        prop::sample::select(vec!["\r\n", "\r\n", "\r\n", ""]),
    )
        .prop_map(|(chunks, trailers, end)| {
            let mut body = Vec::new();
            for (data, ext, upper) in chunks {
                let size = if upper {
                    format!("{:X}", data.len())
                } else {
                    format!("{:x}", data.len())
                };
                body.extend_from_slice(format!("{size}{ext}\r\n").as_bytes());
                body.extend_from_slice(&data);
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(b"0\r\n");
            for trailer in trailers {
                body.extend_from_slice(trailer.as_bytes());
                body.extend_from_slice(b"\r\n");
            }
            body.extend_from_slice(end.as_bytes());
            body
        })
}
