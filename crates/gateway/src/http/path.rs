//! Request paths, normalized once before routing so that routing, API-key
//! checks and the upstream all see the same path (RFC 3986 §6.2.2).
//!
//! - Percent-encoded unreserved characters are decoded (`%2e` → `.`,
//!   `%41` → `A`); other escapes get upper-case hex digits.
//! - Runs of slashes become one (`//admin` → `/admin`).
//! - Dot segments are removed (`/x/../admin` → `/admin`); `..` never
//!   climbs above the root.
//! - An encoded slash or backslash (`%2F`, `%5C`) is refused or kept as it
//!   is ([`EscapedSlashes`]); a `%` not followed by two hex digits and a
//!   literal backslash are refused.
//!
//! A path that needs none of this is returned as it is, without copying.

use std::borrow::Cow;
use std::fmt;

use crate::config::EscapedSlashes;

/// Why a path was refused (the client gets 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// `%` without two hex digits after it.
    BadEscape,
    /// `%2F` or `%5C`, refused by config.
    EscapedSlash,
    /// A literal `\`.
    Backslash,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathError::BadEscape => "malformed percent-encoding in the path",
            PathError::EscapedSlash => "encoded slash or backslash in the path",
            PathError::Backslash => "backslash in the path",
        })
    }
}

impl std::error::Error for PathError {}

/// `path` (without its query) in normal form.
pub fn normalize(path: &str, escaped_slashes: EscapedSlashes) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        // `*` (OPTIONS) or an empty absolute-form path: nothing to resolve.
        return Ok(Cow::Borrowed(path));
    }
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path, escaped_slashes)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// Whether `path` has no escape, backslash, empty segment or dot segment.
fn is_normal(path: &[u8]) -> bool {
    let mut previous = 0u8;
    for (i, &b) in path.iter().enumerate() {
        match b {
            b'%' | b'\\' => return false,
            b'/' if previous == b'/' => return false,
            b'.' if previous == b'/' => {
                // `/.` starts a dot segment when `.` or `..` fills it.
                let rest = &path[i..];
                let segment = rest.split(|&c| c == b'/').next().unwrap_or(rest);
                if segment == b"." || segment == b".." {
                    return false;
                }
            }
            _ => {}
        }
        previous = b;
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Appends `byte` as `%XX` (upper-case hex).
pub(crate) fn push_escaped(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0xf)]));
}

/// Appends `value` as one path segment or query value: only unreserved
/// characters (RFC 3986 §2.3) stay as they are, so a value cannot add a
/// segment or a parameter.
pub(crate) fn push_component(out: &mut String, value: &[u8]) {
    for &byte in value {
        if is_unreserved(byte) {
            out.push(char::from(byte));
        } else {
            push_escaped(out, byte);
        }
    }
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn decode_unreserved(path: &str, escaped_slashes: EscapedSlashes) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let value = hi << 4 | lo;
                if is_unreserved(value) {
                    out.push(char::from(value));
                } else {
                    if matches!(value, b'/' | b'\\') && escaped_slashes == EscapedSlashes::Reject {
                        return Err(PathError::EscapedSlash);
                    }
                    push_escaped(&mut out, value);
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            _ => {
                // Copy the run up to the next escape whole (it may be UTF-8).
                let end = bytes[i..]
                    .iter()
                    .position(|&b| b == b'%' || b == b'\\')
                    .map_or(bytes.len(), |n| i + n);
                out.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    Ok(out)
}

/// Removes `.` and `..` segments and empty ones (a trailing slash stays).
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    let parts: Vec<&str> = path.split('/').skip(1).collect();
    for (i, segment) in parts.iter().enumerate() {
        let last = i + 1 == parts.len();
        match *segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
        trailing_slash = last && matches!(*segment, "" | "." | "..");
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if segments.is_empty() || trailing_slash {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(path: &str) -> Result<String, PathError> {
        normalize(path, EscapedSlashes::Reject).map(Cow::into_owned)
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for path in [
            "/",
            "/a/b",
            "/a/b/",
            "/.well-known/x",
            "/a.b/..c/d..",
            "*",
            "",
        ] {
            assert!(
                matches!(normalize(path, EscapedSlashes::Reject), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
    }

    #[test]
    fn dot_segments_and_slashes_resolve() {
        for (path, want) in [
            ("/x/../admin", "/admin"),
            ("/x/./admin", "/x/admin"),
            ("/../../admin", "/admin"),
            ("//admin", "/admin"),
            ("/a//b///c", "/a/b/c"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a/..", "/"),
            ("/..", "/"),
            ("/a/b/", "/a/b/"),
            ("/a//", "/a/"),
        ] {
            assert_eq!(n(path).as_deref(), Ok(want), "{path}");
        }
    }

    #[test]
    fn unreserved_escapes_decode_before_dot_segments_resolve() {
        assert_eq!(n("/x/%2e%2e/admin").as_deref(), Ok("/admin"));
        assert_eq!(n("/x/%2E./admin").as_deref(), Ok("/admin"));
        assert_eq!(n("/%61dmin").as_deref(), Ok("/admin"));
        assert_eq!(n("/a%20b/%c3%a9").as_deref(), Ok("/a%20b/%C3%A9"));
        assert_eq!(n("/é/../x").as_deref(), Ok("/x"));
    }

    #[test]
    fn encoded_slashes_bad_escapes_and_backslashes_are_refused() {
        assert_eq!(n("/x%2F..%2Fadmin"), Err(PathError::EscapedSlash));
        assert_eq!(n("/x%5cadmin"), Err(PathError::EscapedSlash));
        assert_eq!(n("/x%2"), Err(PathError::BadEscape));
        assert_eq!(n("/x%zz"), Err(PathError::BadEscape));
        assert_eq!(n("/x\\..\\admin"), Err(PathError::Backslash));
        assert_eq!(
            normalize("/x%2f..%2Fadmin", EscapedSlashes::Keep).as_deref(),
            Ok("/x%2F..%2Fadmin")
        );
    }
}
