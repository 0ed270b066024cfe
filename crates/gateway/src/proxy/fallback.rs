//! Route fallbacks: a static answer, or the last good answer to the same
//! GET (stale-if-error). The third kind, another upstream, is a second
//! forward in the proxy.
//!
//! Stale answers are kept per route, keyed by method-less target and by
//! the client's credentials (API key id, `Authorization`, `Cookie`), so one
//! client is never served another's answer. Only complete `200` answers
//! up to `max_entry_bytes` that do not say `Cache-Control: no-store` are
//! kept, at most `max_entries` of them; the oldest goes first.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{HeaderMap, HeaderName, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use crate::http::body::{self, BoxError, ProxyBody};

/// `x-tidegate-fallback`: which fallback answered.
pub static FALLBACK: HeaderName = HeaderName::from_static("x-tidegate-fallback");

/// A static fallback answer.
pub fn fixed(status: StatusCode, content_type: &str, body: &Bytes) -> Response<ProxyBody> {
    let mut response = Response::new(body::full(body.clone()));
    *response.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    response
        .headers_mut()
        .insert(&FALLBACK, HeaderValue::from_static("static"));
    response
}

#[derive(Debug)]
struct Entry {
    key: Box<str>,
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
    stored: Instant,
}

/// The last good answers of one route.
#[derive(Debug)]
pub struct StaleCache {
    max_age: Duration,
    max_entries: usize,
    max_entry_bytes: usize,
    hasher: RandomState,
    entries: Mutex<HashMap<u64, Entry>>,
}

impl StaleCache {
    /// An empty cache.
    pub fn new(max_age: Duration, max_entries: usize, max_entry_bytes: usize) -> Arc<Self> {
        Arc::new(StaleCache {
            max_age,
            max_entries,
            max_entry_bytes,
            hasher: RandomState::new(),
            entries: Mutex::new(HashMap::new()),
        })
    }

    /// Whether the cache was made with these settings.
    pub fn has_settings(
        &self,
        max_age: Duration,
        max_entries: usize,
        max_entry_bytes: usize,
    ) -> bool {
        (self.max_age, self.max_entries, self.max_entry_bytes)
            == (max_age, max_entries, max_entry_bytes)
    }

    /// Answers kept now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The kept answer for `key`, if fresh enough, marked as stale with its `Age`.
    pub fn serve(&self, key: &str) -> Option<Response<ProxyBody>> {
        let entries = self.lock();
        let entry = entries.get(&self.hasher.hash_one(key))?;
        let age = entry.stored.elapsed();
        if *entry.key != *key || age > self.max_age {
            return None;
        }
        let mut response = Response::new(body::full(entry.body.clone()));
        *response.status_mut() = entry.status;
        *response.headers_mut() = entry.headers.clone();
        let headers = response.headers_mut();
        headers.insert(header::AGE, HeaderValue::from(age.as_secs()));
        headers.insert(&FALLBACK, HeaderValue::from_static("stale"));
        Some(response)
    }

    /// Wraps a good answer's body so that, once it has been sent whole, the
    /// answer is kept under `key`. Answers that may not be kept pass as they are.
    pub fn record(
        self: &Arc<Self>,
        key: String,
        response: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        let response = crate::http::fields::materialized(response);
        let keep = response.status() == StatusCode::OK
            && !no_store(response.headers())
            && !is_event_stream(response.headers())
            && response
                .body()
                .size_hint()
                .upper()
                .is_none_or(|n| n <= self.max_entry_bytes as u64);
        if !keep {
            return response;
        }
        let (parts, inner) = response.into_parts();
        let mut headers = parts.headers.clone();
        headers.remove(header::CONTENT_LENGTH);
        let recording = Recording {
            inner,
            buffer: Some(BytesMut::new()),
            pending: Some(Pending {
                cache: self.clone(),
                key,
                status: parts.status,
                headers,
            }),
        };
        Response::from_parts(parts, ProxyBody::new(recording))
    }

    fn insert(&self, key: String, status: StatusCode, headers: HeaderMap, body: Bytes) {
        let hash = self.hasher.hash_one(key.as_str());
        let mut entries = self.lock();
        if !entries.contains_key(&hash) && entries.len() >= self.max_entries {
            let oldest = entries
                .iter()
                .min_by_key(|(_, e)| e.stored)
                .map(|(&h, _)| h);
            if let Some(h) = oldest {
                entries.remove(&h);
            }
        }
        entries.insert(
            hash,
            Entry {
                key: key.into(),
                status,
                headers,
                body,
                stored: Instant::now(),
            },
        );
    }
}

/// The cache key of a request: its target and the credentials it carries.
pub fn key(target: &str, api_key_id: Option<&str>, headers: &HeaderMap) -> String {
    let mut key = String::with_capacity(target.len() + 16);
    key.push_str(target);
    key.push('\0');
    key.push_str(api_key_id.unwrap_or(""));
    for name in [header::AUTHORIZATION, header::COOKIE] {
        for value in headers.get_all(&name) {
            key.push('\0');
            key.push_str(&String::from_utf8_lossy(value.as_bytes()));
        }
    }
    key
}

fn no_store(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CACHE_CONTROL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|d| d.trim().eq_ignore_ascii_case("no-store"))
}

fn is_event_stream(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("text/event-stream"))
}

#[derive(Debug)]
struct Pending {
    cache: Arc<StaleCache>,
    key: String,
    status: StatusCode,
    headers: HeaderMap,
}

/// A body that keeps a copy of what passes, and stores it when it ends whole.
struct Recording {
    inner: ProxyBody,
    /// `None` once the body grew past the entry limit.
    buffer: Option<BytesMut>,
    pending: Option<Pending>,
}

impl Recording {
    fn store(&mut self) {
        if let (Some(buffer), Some(p)) = (self.buffer.take(), self.pending.take()) {
            p.cache.insert(p.key, p.status, p.headers, buffer.freeze());
        }
    }
}

impl Body for Recording {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let (Some(data), Some(buffer), Some(pending)) =
                    (frame.data_ref(), &mut this.buffer, &this.pending)
                {
                    if buffer.len() + data.len() > pending.cache.max_entry_bytes {
                        this.buffer = None;
                    } else {
                        buffer.extend_from_slice(data);
                    }
                }
            }
            Some(Err(_)) => this.buffer = None,
            None => this.store(),
        }
        // hyper stops polling once a body of known length is written, so
        // the end is taken as soon as the inner body says it has come.
        if this.inner.is_end_stream() {
            this.store();
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn drain(response: Response<ProxyBody>) -> Bytes {
        response.into_body().collect().await.unwrap().to_bytes()
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_whole_good_answers_and_serves_them_until_max_age() {
        let cache = StaleCache::new(Duration::from_secs(60), 2, 100);
        let mut ok = Response::new(body::full("fresh"));
        ok.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(cache.serve("/a").is_none());
        assert_eq!(drain(cache.record("/a".into(), ok)).await, "fresh");

        tokio::time::advance(Duration::from_secs(30)).await;
        let stale = cache.serve("/a").unwrap();
        assert_eq!(stale.headers()["age"], "30");
        assert_eq!(stale.headers()["x-tidegate-fallback"], "stale");
        assert_eq!(stale.headers()["content-type"], "text/plain");
        assert_eq!(drain(stale).await, "fresh");

        tokio::time::advance(Duration::from_secs(31)).await;
        assert!(cache.serve("/a").is_none(), "past max_age");
    }

    #[tokio::test(start_paused = true)]
    async fn skips_what_must_not_be_kept_and_bounds_entries() {
        let cache = StaleCache::new(Duration::from_secs(60), 2, 10);
        let big = Response::new(body::full("more than ten bytes"));
        drain(cache.record("/big".into(), big)).await;
        let mut error = Response::new(body::full("no"));
        *error.status_mut() = StatusCode::NOT_FOUND;
        drain(cache.record("/404".into(), error)).await;
        let mut private = Response::new(body::full("secret"));
        private.headers_mut().insert(
            header::CACHE_CONTROL,
            HeaderValue::from_static("private, no-store"),
        );
        drain(cache.record("/private".into(), private)).await;
        assert!(cache.is_empty());

        for path in ["/1", "/2", "/3"] {
            drain(cache.record(path.into(), Response::new(body::full("x")))).await;
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(cache.len(), 2);
        assert!(cache.serve("/1").is_none(), "the oldest went first");
        assert!(cache.serve("/3").is_some());
    }

    #[test]
    fn keys_separate_credentials() {
        let mut headers = HeaderMap::new();
        let anonymous = key("/a?x=1", None, &headers);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer u1"));
        let user = key("/a?x=1", None, &headers);
        assert_ne!(anonymous, user);
        assert_ne!(key("/a?x=1", Some("team-a"), &HeaderMap::new()), anonymous);
    }
}
