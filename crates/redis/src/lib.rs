//! Rate-limit counts in Redis, shared by every tidegate replica.
//!
//! [`RedisStore`] implements the limiter [`Store`] trait of
//! `tidegate-resilience`: each decision is one round trip, one Lua script
//! that reads the server's clock (`TIME`, so replica clocks may drift),
//! decides and counts atomically. All five algorithms run there with the
//! local store's arithmetic. The script is sent by its SHA and loaded again
//! when the server answers `NOSCRIPT` (after a restart, or `SCRIPT FLUSH`).
//!
//! A key's state lives at `tidegate:{KEY}:ALGORITHM`. The braces are a
//! Redis Cluster hash tag, so clients spread over the cluster's slots and
//! each decision touches one; a changed algorithm starts from fresh state,
//! as it does locally. With [`RedisConfig::cluster`] the URL is a seed node
//! of a Redis Cluster and each decision goes to the node owning its slot.
//!
//! The store never makes a request wait on a dead server: every decision
//! has a timeout, and a circuit breaker in front of Redis answers at once
//! while it is open. The connection is made lazily and remade after a loss
//! (with backoff up to a second), and a background ping every second keeps
//! [`RedisStore::is_up`] current and the breaker probing, so counting
//! resumes within a few seconds of the server coming back. What to do when
//! the store cannot decide (admit, refuse, count locally) is the caller's
//! choice.
//!
//! A `rediss://` URL speaks TLS (rustls), checking the server against the
//! system's roots or [`RedisConfig::tls`]'s CA, with a client certificate
//! when the server asks for one. Certificate checks cannot be turned off
//! (`#insecure` is refused).

#![forbid(unsafe_code)]

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{
    Client, ClientTlsConfig, FromRedisValue, IntoConnectionInfo, RedisResult, Script,
    ScriptInvocation, TlsCertificates,
};
use tidegate_resilience::breaker::{self, CircuitBreaker};
use tidegate_resilience::ratelimit::{Decision, Limit, Store, StoreError};

/// Settings of a [`RedisStore`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]`; may hold a secret, so it
    /// is never logged.
    pub url: String,
    /// How long one decision may take before the store gives up. Default 50 ms.
    pub timeout: Duration,
    /// Failed decisions in a row that open the breaker. Default 3.
    pub consecutive_failures: u32,
    /// How long the breaker stays open before one decision probes. Default 1 s.
    pub open_duration: Duration,
    /// How often the background ping checks the server. Default 1 s.
    pub ping_interval: Duration,
    /// `url` is one node of a Redis Cluster; the others are discovered.
    pub cluster: bool,
    /// For a `rediss://` URL: a private CA and a client certificate.
    pub tls: Option<RedisTls>,
}

/// TLS material of a `rediss://` server (PEM bytes).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// The CA the server's certificate must chain to; default: the
    /// system's roots.
    pub ca: Option<Vec<u8>>,
    /// A certificate chain and its key, for servers that require clients'
    /// certificates (`tls-auth-clients yes`).
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

impl fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The key is a secret.
        f.debug_struct("RedisTls")
            .field("ca", &self.ca.is_some())
            .field("client", &self.client.is_some())
            .finish()
    }
}

impl RedisTls {
    fn certificates(&self) -> TlsCertificates {
        TlsCertificates {
            client_tls: self
                .client
                .clone()
                .map(|(client_cert, client_key)| ClientTlsConfig {
                    client_cert,
                    client_key,
                }),
            root_cert: self.ca.clone(),
        }
    }
}

impl RedisConfig {
    /// The defaults for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            timeout: Duration::from_millis(50),
            consecutive_failures: 3,
            open_duration: Duration::from_secs(1),
            ping_interval: Duration::from_secs(1),
            cluster: false,
            tls: None,
        }
    }
}

/// The URL could not be used.
#[derive(Debug)]
pub struct InvalidUrl(redis::RedisError);

impl fmt::Display for InvalidUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The error may quote the URL, and with it a password: say only why.
        write!(f, "not a usable Redis URL ({:?})", self.0.kind())
    }
}

impl std::error::Error for InvalidUrl {}

/// Checks a Redis URL without connecting.
pub fn check_url(url: &str) -> Result<(), InvalidUrl> {
    if url.contains('#') {
        // `#insecure` would turn certificate checks off.
        return Err(InvalidUrl(redis::RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "a fragment (#insecure) is not accepted",
        ))));
    }
    Client::open(url).map(drop).map_err(InvalidUrl)
}

/// Limiter state in Redis. Cheap to clone; clones share one connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    script: Script,
    timeout: Duration,
    breaker: CircuitBreaker,
    /// How the last exchange with the server went.
    up: AtomicBool,
    /// Where the server is, without credentials, for logs.
    endpoint: String,
    pinger: tokio::task::AbortHandle,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.pinger.abort();
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("endpoint", &self.inner.endpoint)
            .field("up", &self.is_up())
            .finish_non_exhaustive()
    }
}

/// One server through a reconnecting manager, or a cluster, connected on
/// first use (its client then follows slot moves and reconnects nodes).
enum Connection {
    Single(ConnectionManager),
    Cluster(Box<Cluster>),
}

struct Cluster {
    client: ClusterClient,
    connected: tokio::sync::OnceCell<ClusterConnection>,
}

impl Connection {
    /// Runs `script` as prepared, or the ping (`None`).
    async fn run<T: FromRedisValue>(
        &self,
        invocation: Option<&ScriptInvocation<'_>>,
    ) -> RedisResult<T> {
        match self {
            Connection::Single(manager) => {
                let mut connection = manager.clone();
                run_on(&mut connection, invocation).await
            }
            Connection::Cluster(cluster) => {
                let connection = cluster
                    .connected
                    .get_or_try_init(|| cluster.client.get_async_connection())
                    .await?;
                run_on(&mut connection.clone(), invocation).await
            }
        }
    }
}

async fn run_on<C, T>(
    connection: &mut C,
    invocation: Option<&ScriptInvocation<'_>>,
) -> RedisResult<T>
where
    C: redis::aio::ConnectionLike + Send,
    T: FromRedisValue,
{
    match invocation {
        Some(invocation) => invocation.invoke_async(connection).await,
        None => redis::cmd("PING").query_async(connection).await,
    }
}

/// The script's algorithm names are the config names.
const SCRIPT: &str = include_str!("limit.lua");

impl RedisStore {
    /// A store for `config.url`. It connects on first use and starts its
    /// background ping, so it must be called inside a Tokio runtime; a
    /// server that is down now is not an error.
    pub fn open(config: &RedisConfig) -> Result<Self, InvalidUrl> {
        let info = config
            .url
            .as_str()
            .into_connection_info()
            .map_err(InvalidUrl)?;
        let endpoint = info.addr().to_string();
        let connect_timeout = config.timeout.max(Duration::from_millis(250));
        let connection = if config.cluster {
            let mut builder = ClusterClientBuilder::new([config.url.as_str()]);
            if let Some(tls) = &config.tls {
                builder = builder.certs(tls.certificates());
            }
            let client = builder
                .connection_timeout(connect_timeout)
                .response_timeout(config.timeout)
                .retries(2)
                .min_retry_wait(20)
                .max_retry_wait(1000)
                .build()
                .map_err(InvalidUrl)?;
            Connection::Cluster(Box::new(Cluster {
                client,
                connected: tokio::sync::OnceCell::new(),
            }))
        } else {
            let manager = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(config.timeout))
                .set_min_delay(Duration::from_millis(20))
                .set_max_delay(Duration::from_secs(1))
                .set_number_of_retries(3);
            let client = match &config.tls {
                Some(tls) => Client::build_with_tls(info, tls.certificates()),
                None => Client::open(info),
            }
            .map_err(InvalidUrl)?;
            Connection::Single(
                ConnectionManager::new_lazy_with_config(client, manager).map_err(InvalidUrl)?,
            )
        };
        let breaker = CircuitBreaker::new(breaker::Config {
            consecutive_failures: config.consecutive_failures.max(1),
            // Only the consecutive count trips it.
            minimum_calls: u32::MAX,
            window: breaker::WindowKind::Time,
            open_duration: config.open_duration,
            ..breaker::Config::default()
        });
        let interval = config.ping_interval;
        let inner = Arc::new_cyclic(|weak: &std::sync::Weak<Inner>| {
            let weak = weak.clone();
            let pinger = tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let Some(inner) = weak.upgrade() else { return };
                    inner.ping().await;
                }
            });
            Inner {
                connection,
                script: Script::new(SCRIPT),
                timeout: config.timeout,
                breaker,
                up: AtomicBool::new(false),
                endpoint,
                pinger: pinger.abort_handle(),
            }
        });
        Ok(RedisStore { inner })
    }

    /// Whether the last exchange with the server succeeded.
    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// `host:port` of the server (no credentials).
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// Asks the server for `PONG` now; the answer updates [`is_up`](Self::is_up).
    pub async fn ping(&self) -> bool {
        self.inner.ping().await
    }

    /// Decides on a request of `cost` units for `key` under `limit`.
    pub async fn decide(
        &self,
        key: &str,
        limit: &Limit,
        cost: u32,
    ) -> Result<Decision, StoreError> {
        let inner = &*self.inner;
        let permit = inner.breaker.try_acquire().map_err(|open| {
            StoreError::unavailable(format!("{open}: Redis at {}", inner.endpoint))
        })?;
        let quota = &limit.quota;
        let period = quota.period.as_micros().max(1);
        let mut invocation = inner.script.key(state_key(key, limit));
        invocation
            .arg(limit.algorithm.as_str())
            .arg(quota.limit)
            .arg(u64::try_from(period).unwrap_or(u64::MAX))
            .arg(quota.burst())
            .arg(cost);
        let reply = tokio::time::timeout(
            inner.timeout,
            inner
                .connection
                .run::<(u8, u64, i64, i64)>(Some(&invocation)),
        )
        .await;
        let result = match reply {
            Ok(Ok((allowed, remaining, reset, retry))) => Ok(Decision {
                allowed: allowed == 1,
                limit: quota.limit,
                remaining: u32::try_from(remaining).unwrap_or(u32::MAX),
                reset: micros(reset),
                retry_after: (retry >= 0).then(|| micros(retry)),
            }),
            Ok(Err(e)) if e.is_timeout() => Err(StoreError::timeout(e)),
            Ok(Err(e)) => Err(StoreError::new(e)),
            Err(elapsed) => Err(StoreError::timeout(elapsed)),
        };
        match &result {
            Ok(_) => permit.success(),
            Err(_) => permit.failure(),
        }
        inner.mark(result.is_ok());
        result
    }
}

impl Inner {
    async fn ping(&self) -> bool {
        let pong = tokio::time::timeout(
            self.timeout.max(Duration::from_millis(250)),
            self.connection.run::<String>(None),
        )
        .await;
        let up = matches!(pong, Ok(Ok(_)));
        self.mark(up);
        up
    }

    fn mark(&self, up: bool) {
        if self.up.swap(up, Ordering::Relaxed) != up {
            if up {
                tracing::info!(redis = %self.endpoint, "rate-limit store is reachable");
            } else {
                tracing::warn!(redis = %self.endpoint, "rate-limit store is unreachable");
            }
        }
    }
}

impl Store for RedisStore {
    fn check(
        &self,
        key: &str,
        limit: &Limit,
        cost: u32,
    ) -> impl Future<Output = Result<Decision, StoreError>> + Send {
        self.decide(key, limit, cost)
    }
}

/// Where `key`'s state under `limit`'s algorithm lives; the braces make the
/// key its own Redis Cluster hash slot.
pub fn state_key(key: &str, limit: &Limit) -> String {
    format!("tidegate:{{{key}}}:{}", limit.algorithm.as_str())
}

fn micros(n: i64) -> Duration {
    Duration::from_micros(u64::try_from(n).unwrap_or(0))
}
