//! `[events]`: the event store, the events listener, topics' retention and
//! subscriptions (consumer groups), pull or pushed to an upstream.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use tidegate_client::config::check_name;
use tidegate_client::config::file::KeyPath;
use tidegate_events::{Backoff, Ordering, Start, SubscriptionConfig};
use tidegate_resilience::config::duration;

use super::{ConfigError, Locator, UpstreamConfig};

/// `[events]` as written.
#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RawEvents {
    store: String,
    path: Option<PathBuf>,
    nats_url: Option<String>,
    nats_credentials_env: Option<String>,
    nats_replicas: Option<usize>,
    nats_tls: Option<super::TlsFiles>,
    listen: SocketAddr,
    require_api_key: bool,
    #[serde(with = "duration")]
    dedup_window: Duration,
    max_body_bytes: u64,
    topics: Vec<RawTopic>,
    subscriptions: Vec<RawSubscription>,
    schemas: Vec<super::schemas::RawSchema>,
}

impl Default for RawEvents {
    fn default() -> Self {
        RawEvents {
            store: "sqlite".into(),
            path: None,
            nats_url: None,
            nats_credentials_env: None,
            nats_replicas: None,
            nats_tls: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 9902)),
            require_api_key: false,
            dedup_window: Duration::from_secs(120),
            max_body_bytes: 1024 * 1024,
            topics: Vec::new(),
            subscriptions: Vec::new(),
            schemas: Vec::new(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    name: String,
    #[serde(default, with = "duration::option")]
    max_age: Option<Duration>,
    max_events: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubscription {
    name: String,
    topic: String,
    #[serde(default)]
    types: Vec<String>,
    push: Option<RawPush>,
    #[serde(default = "max_in_flight")]
    max_in_flight: u32,
    #[serde(default)]
    ordering: RawOrdering,
    #[serde(default = "ack_wait", with = "duration")]
    ack_wait: Duration,
    #[serde(default = "max_deliveries")]
    max_deliveries: u32,
    #[serde(default)]
    backoff: RawBackoff,
    dead_letter_topic: Option<String>,
    #[serde(default)]
    start: RawStart,
}

fn max_in_flight() -> u32 {
    10
}

fn ack_wait() -> Duration {
    Duration::from_secs(30)
}

fn max_deliveries() -> u32 {
    5
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPush {
    upstream: String,
    path: String,
    #[serde(default)]
    mode: PushMode,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawOrdering {
    #[default]
    None,
    Key,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
enum RawStart {
    #[default]
    Earliest,
    Latest,
}

#[derive(Debug, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct RawBackoff {
    #[serde(with = "duration")]
    base_delay: Duration,
    #[serde(with = "duration")]
    max_delay: Duration,
}

impl Default for RawBackoff {
    fn default() -> Self {
        let backoff = Backoff::default();
        RawBackoff {
            base_delay: backoff.base_delay,
            max_delay: backoff.max_delay,
        }
    }
}

/// How a push subscription sends an event (CloudEvents HTTP binding).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PushMode {
    /// The attributes as `ce-*` headers, the data as the body.
    #[default]
    Binary,
    /// The whole event as `application/cloudevents+json`.
    Structured,
}

/// Where the events are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventStore {
    /// One SQLite file (`events.path`, default `tidegate-events.db`).
    Sqlite {
        /// The file.
        path: PathBuf,
    },
    /// NATS JetStream, shared by gateway replicas.
    Nats {
        /// `nats://host:port`, several separated by commas (a cluster).
        url: String,
        /// The environment variable holding `user:password` or a token.
        credentials_env: Option<String>,
        /// Copies of each stream (3 on a cluster of three).
        replicas: usize,
        /// `nats_tls`: a private CA, a client certificate.
        tls: Option<tidegate_nats::NatsTls>,
    },
}

/// `[events]`, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EventsSettings {
    /// Where the events are kept.
    pub store: EventStore,
    /// Where the events API is served (loopback by default).
    pub listen: SocketAddr,
    /// Only callers with an API key whose `topics` match may use a topic.
    pub require_api_key: bool,
    /// An event whose id the topic saw this recently is a duplicate.
    pub dedup_window: Duration,
    /// Largest request body of the events API; over it → 413.
    pub max_body_bytes: u64,
    /// `[[events.topics]]`: retention per topic.
    pub topics: Vec<TopicSettings>,
    /// `[[events.subscriptions]]`.
    pub subscriptions: Vec<Subscription>,
    /// `[[events.schemas]]`: event contracts.
    pub schemas: Vec<super::schemas::SchemaSettings>,
}

/// `[[events.topics]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSettings {
    /// The topic.
    pub name: String,
    /// Events older than this are deleted.
    pub max_age: Option<Duration>,
    /// All but the newest this many are deleted.
    pub max_events: Option<u64>,
}

/// `[[events.subscriptions]]`: a consumer group, pulled by workers or
/// pushed to an upstream.
#[derive(Debug, Clone, PartialEq)]
pub struct Subscription {
    /// The group's settings in the store.
    pub config: SubscriptionConfig,
    /// Where its events are pushed; `None`: pulled over the events API.
    pub push: Option<Push>,
}

/// `push = { upstream, path, mode }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// The upstream's name (its policies apply to every delivery).
    pub upstream: String,
    /// The path each event is POSTed to.
    pub path: String,
    /// Binary (default) or structured CloudEvents.
    pub mode: PushMode,
}

impl Locator<'_> {
    pub(super) fn events(
        &self,
        raw: RawEvents,
        upstreams: &[UpstreamConfig],
    ) -> Result<EventsSettings, ConfigError> {
        let at = KeyPath::default().key("events");
        let only = |key: &str, store: &str| {
            self.error(
                &at.clone().key(key),
                format!("applies only with store = \"{store}\""),
            )
        };
        let store = match raw.store.as_str() {
            "sqlite" => {
                for (key, set) in [
                    ("nats_url", raw.nats_url.is_some()),
                    ("nats_credentials_env", raw.nats_credentials_env.is_some()),
                    ("nats_replicas", raw.nats_replicas.is_some()),
                    ("nats_tls", raw.nats_tls.is_some()),
                ] {
                    if set {
                        return Err(only(key, "nats"));
                    }
                }
                let path = raw
                    .path
                    .unwrap_or_else(|| PathBuf::from("tidegate-events.db"));
                if path.as_os_str().is_empty() {
                    return Err(self.error(&at.key("path"), "must name a file"));
                }
                EventStore::Sqlite { path }
            }
            "nats" => {
                if raw.path.is_some() {
                    return Err(only("path", "sqlite"));
                }
                let Some(url) = raw.nats_url else {
                    return Err(self.error(&at.key("store"), "store = \"nats\" needs nats_url"));
                };
                let bad_url = url.split(',').any(|one| {
                    let one = one.trim();
                    let rest = one
                        .strip_prefix("nats://")
                        .or_else(|| one.strip_prefix("tls://"));
                    rest.is_none_or(str::is_empty) || one.contains('@')
                });
                if bad_url {
                    return Err(self.error(
                        &at.key("nats_url"),
                        "must be nats://host:port or tls://host:port (several separated by commas), with no user or password: name them with nats_credentials_env",
                    ));
                }
                let tls = match &raw.nats_tls {
                    Some(files) => {
                        self.check_tls_files(&at.clone().key("nats_tls"), files)?;
                        let client = match (&files.client_cert, &files.client_key) {
                            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
                            _ => None,
                        };
                        Some(tidegate_nats::NatsTls {
                            ca: files.ca.clone(),
                            client,
                        })
                    }
                    None => None,
                };
                if let Some(var) = &raw.nats_credentials_env {
                    if var.is_empty() || var.contains('=') {
                        return Err(self.error(
                            &at.key("nats_credentials_env"),
                            "must be an environment variable name",
                        ));
                    }
                }
                let replicas = raw.nats_replicas.unwrap_or(1);
                if !(1..=5).contains(&replicas) {
                    return Err(self.error(&at.key("nats_replicas"), "must be from 1 to 5"));
                }
                EventStore::Nats {
                    url,
                    credentials_env: raw.nats_credentials_env,
                    replicas,
                    tls,
                }
            }
            other => {
                return Err(self.error(
                    &at.key("store"),
                    format!("unknown store `{other}` (expected \"sqlite\" or \"nats\")"),
                ))
            }
        };
        if raw.max_body_bytes == 0 {
            return Err(self.error(&at.key("max_body_bytes"), "must be at least 1"));
        }
        let mut topics: Vec<TopicSettings> = Vec::with_capacity(raw.topics.len());
        for (i, t) in raw.topics.into_iter().enumerate() {
            let key = at.clone().key("topics").index(i);
            check_name(&t.name).map_err(|r| self.error(&key.clone().key("name"), r))?;
            if topics.iter().any(|other| other.name == t.name) {
                return Err(self.error(&key.key("name"), format!("duplicate topic `{}`", t.name)));
            }
            if t.max_age.is_some_and(|age| age.is_zero()) {
                return Err(self.error(&key.key("max_age"), "must be greater than 0"));
            }
            topics.push(TopicSettings {
                name: t.name,
                max_age: t.max_age,
                max_events: t.max_events,
            });
        }
        let mut subscriptions: Vec<Subscription> = Vec::with_capacity(raw.subscriptions.len());
        for (i, s) in raw.subscriptions.into_iter().enumerate() {
            let key = at.clone().key("subscriptions").index(i);
            check_name(&s.name).map_err(|r| self.error(&key.clone().key("name"), r))?;
            if subscriptions
                .iter()
                .any(|other| other.config.name == s.name)
            {
                return Err(self.error(
                    &key.key("name"),
                    format!("duplicate subscription `{}`", s.name),
                ));
            }
            check_name(&s.topic).map_err(|r| self.error(&key.clone().key("topic"), r))?;
            if let Some(dead) = &s.dead_letter_topic {
                check_name(dead)
                    .map_err(|r| self.error(&key.clone().key("dead_letter_topic"), r))?;
                if *dead == s.topic {
                    return Err(self.error(
                        &key.key("dead_letter_topic"),
                        "must be another topic than the subscription's own",
                    ));
                }
            }
            for (j, ty) in s.types.iter().enumerate() {
                if ty.is_empty() {
                    return Err(self.error(&key.clone().key("types").index(j), "must not be empty"));
                }
            }
            let problem = if s.max_in_flight == 0 {
                Some(("max_in_flight", "must be at least 1"))
            } else if s.ack_wait.is_zero() {
                Some(("ack_wait", "must be greater than 0"))
            } else if s.max_deliveries == 0 {
                Some(("max_deliveries", "must be at least 1"))
            } else if s.backoff.base_delay > s.backoff.max_delay {
                Some(("backoff", "base_delay must not exceed max_delay"))
            } else {
                None
            };
            if let Some((name, reason)) = problem {
                return Err(self.error(&key.key(name), reason));
            }
            let push = match s.push {
                Some(push) => {
                    let p = key.clone().key("push");
                    if !upstreams.iter().any(|u| u.name == push.upstream) {
                        return Err(self.error(
                            &p.key("upstream"),
                            format!("no upstream named `{}`", push.upstream),
                        ));
                    }
                    if !push.path.starts_with('/')
                        || push.path.parse::<http::uri::PathAndQuery>().is_err()
                    {
                        return Err(self.error(&p.key("path"), "must be a path starting with `/`"));
                    }
                    Some(Push {
                        upstream: push.upstream,
                        path: push.path,
                        mode: push.mode,
                    })
                }
                None => None,
            };
            subscriptions.push(Subscription {
                config: SubscriptionConfig {
                    name: s.name,
                    topic: s.topic,
                    types: s.types,
                    ordering: match s.ordering {
                        RawOrdering::None => Ordering::None,
                        RawOrdering::Key => Ordering::Key,
                    },
                    max_in_flight: s.max_in_flight,
                    ack_wait: s.ack_wait,
                    max_deliveries: s.max_deliveries,
                    backoff: Backoff {
                        base_delay: s.backoff.base_delay,
                        max_delay: s.backoff.max_delay,
                    },
                    dead_letter_topic: s.dead_letter_topic,
                    start: match s.start {
                        RawStart::Earliest => Start::Earliest,
                        RawStart::Latest => Start::Latest,
                    },
                },
                push,
            });
        }
        // Schema files are found beside the config file.
        let base = std::path::Path::new(self.0.file())
            .parent()
            .unwrap_or(std::path::Path::new(""));
        let schemas = self.schemas(raw.schemas, base, &at)?;
        Ok(EventsSettings {
            store,
            listen: raw.listen,
            require_api_key: raw.require_api_key,
            dedup_window: raw.dedup_window,
            max_body_bytes: raw.max_body_bytes,
            topics,
            subscriptions,
            schemas,
        })
    }
}

/// A topic pattern of an API key: `*` stands for any run of characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicGlob(String);

impl TopicGlob {
    /// The pattern `text`, or why it is not one.
    pub fn parse(text: &str) -> Result<Self, &'static str> {
        let ok = !text.is_empty()
            && text.len() <= 64
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.*".contains(&b));
        if ok {
            Ok(TopicGlob(text.to_owned()))
        } else {
            Err("must be 1 to 64 of letters, digits, `-`, `_`, `.` or `*`")
        }
    }

    /// Whether `topic` matches.
    pub fn matches(&self, topic: &str) -> bool {
        glob(self.0.as_bytes(), topic.as_bytes())
    }
}

/// `*`-only glob matching, iterative with one backtrack point (linear in
/// practice, never exponential).
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_globs() {
        for (pattern, topic, matches) in [
            ("orders*", "orders", true),
            ("orders*", "orders.dead", true),
            ("orders*", "order", false),
            ("*", "anything", true),
            ("*.dead", "orders.dead", true),
            ("*.dead", "orders.deadline", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("content", "content", true),
            ("content", "contents", false),
        ] {
            let glob = TopicGlob::parse(pattern).unwrap();
            assert_eq!(glob.matches(topic), matches, "{pattern} ~ {topic}");
        }
        assert!(TopicGlob::parse("a/b").is_err());
        assert!(TopicGlob::parse("").is_err());
    }
}
