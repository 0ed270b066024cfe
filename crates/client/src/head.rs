//! The head of an attempt's request, cloned from a template each client
//! makes once.

use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;

use crate::headers::{Trace, CORRELATION_ID, DEADLINE_MS, TRACEPARENT};

/// A client's default headers, `Host` (HTTP/1: else hyper-util formats it
/// for every request) and a slot for each value made per call: correlation
/// ID, `traceparent`, and the time left when the policy has a deadline.
/// The clone an attempt makes has the room and the order its request
/// needs, and the slots are found by position: no hashing, no growth.
#[derive(Debug)]
pub(crate) struct Template {
    head: HeaderMap,
    /// Values ahead of the slots: `Host`, when there is one.
    slots_at: usize,
    /// Whether there is a slot for the deadline.
    deadline: bool,
}

impl Template {
    pub(crate) fn new(
        mut defaults: HeaderMap,
        authority: &Authority,
        http2: bool,
        deadline: bool,
    ) -> Self {
        let slots: &[&HeaderName] = if deadline {
            &[&CORRELATION_ID, &TRACEPARENT, &DEADLINE_MS]
        } else {
            &[&CORRELATION_ID, &TRACEPARENT]
        };
        for name in slots {
            defaults.remove(*name);
        }
        let mut head = HeaderMap::with_capacity(defaults.len() + slots.len() + 1);
        if !http2 && !defaults.contains_key(header::HOST) {
            if let Some(host) = host_value(authority) {
                head.insert(header::HOST, host);
            }
        }
        let slots_at = head.len();
        for name in slots {
            head.insert(*name, HeaderValue::from_static(""));
        }
        let mut last = None;
        for (name, value) in defaults {
            let name = name.or(last).expect("a map's first value has a name");
            head.append(&name, value);
            last = Some(name);
        }
        Template {
            head,
            slots_at,
            deadline,
        }
    }

    /// The head of one attempt: the template with the call's correlation
    /// ID, a span of its `trace` and the time `left` in its slots, and the
    /// call's `own` headers over the defaults (but never over the
    /// propagated ones).
    pub(crate) fn head(
        &self,
        correlation_id: &HeaderValue,
        trace: &Trace,
        left: Option<Duration>,
        own: Option<&HeaderMap>,
    ) -> HeaderMap {
        let mut head = self.head.clone();
        // A policy with a deadline gives every attempt the time left.
        let left = left.filter(|_| self.deadline);
        let mut slots = head.values_mut().skip(self.slots_at);
        let mut slot = || slots.next().expect("the template holds its slots");
        *slot() = correlation_id.clone();
        let span = slot();
        match left {
            Some(left) => (*span, *slot()) = trace.child_and_deadline(left),
            None => *span = trace.child(),
        }
        if self.deadline && left.is_none() {
            // Should one not, the header goes rather than go out empty.
            head.remove(&DEADLINE_MS);
        }
        for (name, value) in own.into_iter().flatten() {
            if !is_propagated(name) {
                head.insert(name, value.clone());
            }
        }
        head
    }
}

/// `Host` as hyper-util would write it: the port only when not 80.
fn host_value(authority: &Authority) -> Option<HeaderValue> {
    let text = match authority.port_u16() {
        None | Some(80) => authority.host(),
        Some(_) => authority.as_str(),
    };
    HeaderValue::from_str(text).ok()
}

/// Headers every attempt sets itself, which a call's own cannot replace.
fn is_propagated(name: &HeaderName) -> bool {
    name == CORRELATION_ID || name == TRACEPARENT || name == DEADLINE_MS
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::headers::Context;

    fn defaults() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::USER_AGENT, HeaderValue::from_static("ua"));
        h.append(header::ACCEPT, HeaderValue::from_static("a/1"));
        h.append(header::ACCEPT, HeaderValue::from_static("a/2"));
        h.insert(&CORRELATION_ID, HeaderValue::from_static("static"));
        h
    }

    /// An attempt's head in `context`.
    fn attempt_head(
        template: &Template,
        context: &Context,
        left: Option<Duration>,
        own: Option<&HeaderMap>,
    ) -> HeaderMap {
        template.head(context.correlation_id(), &context.trace(), left, own)
    }

    fn names(head: &HeaderMap) -> Vec<&str> {
        head.iter().map(|(n, _)| n.as_str()).collect()
    }

    #[test]
    fn slots_are_filled_in_place_and_defaults_kept() {
        let authority: Authority = "10.0.0.1:8080".parse().unwrap();
        let template = Template::new(defaults(), &authority, false, true);
        let context = Context::default();
        let head = attempt_head(&template, &context, Some(Duration::from_millis(1234)), None);
        assert_eq!(
            names(&head),
            [
                "host",
                "x-correlation-id",
                "traceparent",
                "x-tidegate-deadline-ms",
                "user-agent",
                "accept",
                "accept",
            ]
        );
        assert_eq!(head["host"], "10.0.0.1:8080");
        assert_eq!(head["x-correlation-id"], context.correlation_id());
        assert_eq!(head["traceparent"].len(), 55);
        assert_eq!(head["x-tidegate-deadline-ms"], "1234");
        let accept: Vec<_> = head.get_all(header::ACCEPT).iter().collect();
        assert_eq!(accept, ["a/1", "a/2"]);
    }

    #[test]
    fn a_calls_own_headers_replace_defaults_but_not_propagation() {
        let authority: Authority = "svc:80".parse().unwrap();
        let template = Template::new(defaults(), &authority, false, true);
        let mut own = HeaderMap::new();
        own.insert(header::ACCEPT, HeaderValue::from_static("text/plain"));
        own.insert(&CORRELATION_ID, HeaderValue::from_static("mine"));
        own.insert(&DEADLINE_MS, HeaderValue::from_static("1"));
        own.insert("x-extra", HeaderValue::from_static("yes"));
        let context = Context::default();
        let head = attempt_head(
            &template,
            &context,
            Some(Duration::from_secs(2)),
            Some(&own),
        );
        assert_eq!(head["host"], "svc", "port 80 is left out");
        assert_eq!(head["x-correlation-id"], context.correlation_id());
        assert_eq!(head["x-tidegate-deadline-ms"], "2000");
        assert_eq!(head.get_all(header::ACCEPT).iter().count(), 1);
        assert_eq!(head["accept"], "text/plain");
        assert_eq!(head["x-extra"], "yes");
    }

    #[test]
    fn http2_has_no_host_and_no_deadline_without_one() {
        let authority: Authority = "svc:81".parse().unwrap();
        let template = Template::new(HeaderMap::new(), &authority, true, false);
        let head = attempt_head(&template, &Context::default(), None, None);
        assert_eq!(names(&head), ["x-correlation-id", "traceparent"]);

        let mut defaults = HeaderMap::new();
        defaults.insert(header::HOST, HeaderValue::from_static("virtual"));
        let template = Template::new(defaults, &authority, false, false);
        let head = attempt_head(&template, &Context::default(), None, None);
        assert_eq!(head["host"], "virtual", "a configured Host is kept");
    }
}
