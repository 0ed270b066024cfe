//! Config parsing and validation: every error names file, line, column, key and reason.

use std::time::Duration;

use tidegate_gateway::config::{
    parse, Config, ConfigError, FailureMode, GatewaySettings, StoreSettings, Target,
};
use tidegate_resilience::config::PolicyConfig;

const GOOD: &str = r#"
[gateway]
listen = "127.0.0.1:8080"
drain_timeout = "5s"

[defaults.policy]
timeout = "2s"
[defaults.policy.retry]
max_attempts = 3
base_delay = "50ms"

[[upstreams]]
name = "kb"
endpoints = ["http://127.0.0.1:8002", "http://localhost"]
[upstreams.health_check]
path = "/healthz"
interval = "5s"
[upstreams.policy.retry]
max_attempts = 2

[[upstreams]]
name = "users"
endpoints = ["http://127.0.0.1:8003"]

[[routes]]
name = "knowledge"
path_prefix = "/knowledge"
strip_prefix = true
methods = ["GET", "post"]
headers = { "end-user" = "premium" }
upstream = "kb"
"#;

fn ok(text: &str) -> Config {
    parse(text, "t.toml", []).unwrap_or_else(|e| panic!("{e}"))
}

fn err(text: &str) -> String {
    parse(text, "t.toml", []).unwrap_err().to_string()
}

#[test]
fn a_good_config_is_typed_and_merged_with_defaults() {
    let config = ok(GOOD);
    assert_eq!(config.gateway.drain_timeout, Duration::from_secs(5));
    assert_eq!(
        config.gateway.max_header_bytes, 65_536,
        "defaults fill the rest"
    );
    let kb = &config.upstreams[0];
    assert_eq!(kb.endpoints[1].to_string(), "http://localhost:80");
    assert_eq!(
        kb.policy.retry.max_attempts, 2,
        "the upstream's own key wins"
    );
    assert_eq!(
        kb.policy.retry.base_delay,
        Duration::from_millis(50),
        "the rest comes from defaults"
    );
    assert_eq!(kb.policy.timeout, Some(Duration::from_secs(2)));
    assert_eq!(kb.health_check.as_ref().unwrap().unhealthy_threshold, 3);
    assert_eq!(config.upstreams[1].policy.retry.max_attempts, 3);
    let route = &config.routes[0];
    assert_eq!(route.target, Target::Upstream(0));
    assert_eq!(route.methods, [http::Method::GET, http::Method::POST]);
    assert_eq!(route.headers[0].0, "end-user");
}

#[test]
fn unknown_keys_point_at_the_key() {
    let text = GOOD.replace(
        "strip_prefix = true",
        "strip_prefix = true\nstrip_prefx = false",
    );
    let e = err(&text);
    assert!(
        e.starts_with("t.toml:29:1: routes[0].strip_prefx: unknown field `strip_prefx`, expected one of `name`, `path_prefix`, `strip_prefix`"),
        "{e}"
    );
    let text = GOOD.replace("[upstreams.policy.retry]", "[upstreams.policy.retyr]");
    assert!(
        err(&text).starts_with("t.toml:18:19: upstreams[0].policy.retyr: unknown field `retyr`"),
        "{}",
        err(&text)
    );
}

#[test]
fn bad_values_name_their_key() {
    let text = GOOD.replace("interval = \"5s\"", "interval = \"5 parsecs\"");
    let e = err(&text);
    assert!(
        e.starts_with("t.toml:17:1: upstreams[0].health_check.interval: "),
        "{e}"
    );
    let text = GOOD.replace("max_attempts = 2", "max_attempts = 0");
    assert_eq!(
        err(&text),
        "t.toml:19:1: upstreams[0].policy.retry.max_attempts: must be at least 1"
    );
}

#[test]
fn a_bad_default_is_reported_where_it_is_written() {
    let text = GOOD.replace("base_delay = \"50ms\"", "base_delay = \"-1s\"");
    let e = err(&text);
    assert!(e.starts_with("t.toml:10:1: "), "{e}");
    assert!(e.contains("policy.retry.base_delay"), "{e}");
}

#[test]
fn semantic_errors() {
    let cases = [
        (
            GOOD.replace("upstream = \"kb\"", "upstream = \"nope\""),
            "t.toml:31:1: routes[0].upstream: no upstream named `nope`",
        ),
        (
            GOOD.replace("name = \"users\"", "name = \"kb\""),
            "t.toml:22:1: upstreams[1].name: duplicate upstream name `kb`",
        ),
        (
            GOOD.replace("endpoints = [\"http://127.0.0.1:8003\"]", "endpoints = []"),
            "t.toml:23:1: upstreams[1].endpoints: needs at least one endpoint",
        ),
        (
            GOOD.replace("\"http://localhost\"", "\"ftp://localhost\""),
            "t.toml:14:39: upstreams[0].endpoints[1]: `ftp://localhost` must start with http://",
        ),
        (
            GOOD.replace(
                "path_prefix = \"/knowledge\"",
                "path_prefix = \"knowledge\"",
            ),
            "t.toml:27:1: routes[0].path_prefix: must be a path starting with `/`",
        ),
        (
            GOOD.replace("\"post\"", "\"PO ST\""),
            "t.toml:29:19: routes[0].methods[1]: `PO ST` is not an HTTP method",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(err(&text), want);
    }
}

#[test]
fn traffic_and_edge_settings_are_typed() {
    let text = format!(
        "{GOOD}{}",
        r#"rate_limit = { algorithm = "gcra", limit = 10, per = "1s", key = "header:x-tenant" }
tiers = ["gold"]
fallback = { kind = "stale", max_age = "1m" }
fault = { abort_status = 503, abort_percent = 5 }

[[routes]]
name = "canary"
path_prefix = "/canary"
split = [{ upstream = "kb", weight = 9 }, { upstream = "users", weight = 1 }]
fallback = { kind = "static", status = 503, body = "{}" }

[rate_limit]
algorithm = "fixed_window"
[[rate_limit.tiers]]
name = "gold"
requests_per_minute = 600
[[api_keys]]
id = "team-a"
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
tier = "gold"
"#
    );
    let config = ok(&text);
    let route = &config.routes[0];
    assert!(route.require_api_key, "tiers imply a key");
    assert_eq!(route.tiers, [0]);
    assert_eq!(route.fallback.as_ref().map(|f| f.kind()), Some("stale"));
    assert_eq!(route.fault.unwrap().abort_percent, 5.0);
    assert_eq!(route.rate_limit.as_ref().unwrap().limit.quota.limit, 10);
    assert_eq!(config.routes[1].target, Target::Split(vec![(0, 9), (1, 1)]));
    assert_eq!(config.api_keys[0].tier, Some(0));
    assert_eq!(config.rate_limit.tiers[0].requests_per_minute, Some(600));
}

#[test]
fn traffic_and_edge_errors_name_their_key() {
    let route = |extra: &str| format!("{GOOD}{extra}\n");
    let cases = [
        (
            route("split = [{ upstream = \"kb\", weight = 1 }]"),
            "routes[0].split: a route has `upstream` or `split`, not both",
        ),
        (
            GOOD.replace("upstream = \"kb\"", "split = [{ upstream = \"kb\", weight = 0 }]"),
            "routes[0].split: needs a share with weight above 0",
        ),
        (
            route("tiers = [\"gold\"]"),
            "routes[0].tiers[0]: no tier named `gold`",
        ),
        (
            route("rate_limit = { limit = 5, per = \"1m\", key = \"ip\" }"),
            "routes[0].rate_limit.key: `ip` is not a key: use client_ip, api_key or header:NAME",
        ),
        (
            route("rate_limit = { limit = 0, per = \"1m\" }"),
            "routes[0].rate_limit.limit: must be at least 1",
        ),
        (
            route("fallback = { kind = \"upstream\", upstream = \"kb\" }"),
            "routes[0].fallback.upstream: the fallback must be another upstream than the route's own",
        ),
        (
            route("fault = { delay_percent = 5 }"),
            "routes[0].fault.delay: a fault needs a delay, an abort_status or both",
        ),
        (
            route("fault = { abort_status = 200 }"),
            "routes[0].fault.abort_status: must be a 4xx or 5xx status",
        ),
        (
            GOOD.replace("name = \"users\"", "name = \"users\"\nload_balancing = \"consistent_hash\""),
            "upstreams[1].hash_header: consistent_hash needs the header to hash",
        ),
        (
            GOOD.replace(
                "endpoints = [\"http://127.0.0.1:8003\"]",
                "endpoints = [\"http://127.0.0.1:8003\"]\n[upstreams.outlier_detection]\nmax_ejection_percent = 101",
            ),
            "upstreams[1].outlier_detection.max_ejection_percent: must be at most 100",
        ),
        (
            GOOD.replace(
                "endpoints = [\"http://127.0.0.1:8003\"]",
                "endpoints = [\"http://127.0.0.1:8003\"]\n[upstreams.pool]\nmax_connections = 0",
            ),
            "upstreams[1].pool.max_connections: must be at least 1",
        ),
        (
            format!("{GOOD}[rate_limit]\nstore = \"redis\"\n"),
            "rate_limit.store: store = \"redis\" needs redis_url",
        ),
        (
            format!("{GOOD}[rate_limit]\nredis_url = \"redis://127.0.0.1\"\n"),
            "rate_limit.redis_url: applies only with store = \"redis\"",
        ),
        (
            format!("{GOOD}[rate_limit]\nfailure_mode = \"closed\"\n"),
            "rate_limit.failure_mode: applies only with store = \"redis\"",
        ),
        (
            format!("{GOOD}[rate_limit]\nstore = \"redis\"\nredis_url = \"redis://:pw@h\"\ntimeout = \"0s\"\n"),
            "rate_limit.timeout: must be greater than 0 and at most 10s",
        ),
        (
            format!("{GOOD}[rate_limit]\nstore = \"memcached\"\n"),
            "rate_limit.store: unknown variant `memcached`, expected `local` or `redis`",
        ),
        (
            GOOD.replace("name = \"users\"", "name = \"users\"\nprotocol = \"h3\""),
            "upstreams[1].protocol: unknown variant `h3`, expected one of `http1`, `http2`, `auto`",
        ),
        (
            GOOD.replace("path = \"/healthz\"", "kind = \"grpc\""),
            "upstreams[0].health_check.kind: gRPC health checks need the upstream's protocol = \"http2\"",
        ),
        (
            GOOD.replace("path = \"/healthz\"", "kind = \"grpc\"\npath = \"/x\"")
                .replace("name = \"kb\"", "name = \"kb\"\nprotocol = \"http2\""),
            "upstreams[0].health_check.path: is for kind = \"http\"; a gRPC check asks a `service`",
        ),
        (
            GOOD.replace("path = \"/healthz\"", "service = \"kb\""),
            "upstreams[0].health_check.service: is for kind = \"grpc\"",
        ),
        (
            format!("{GOOD}[[api_keys]]\nid = \"a\"\nkey_sha256 = \"secret\"\n"),
            "api_keys[0].key_sha256: must be the key's SHA-256 as 64 hex digits (sha256sum prints it)",
        ),
    ];
    for (text, want) in cases {
        let e = err(&text);
        assert!(
            e.starts_with("t.toml:") && e.ends_with(want),
            "{e}\nwanted …{want}"
        );
    }
}

#[test]
fn a_redis_store_is_typed_and_its_password_never_printed() {
    let text = format!(
        "{GOOD}[rate_limit]\nstore = \"redis\"\nredis_url = \"redis://:hunter2@10.0.0.5:6379/2\"\nfailure_mode = \"closed\"\n"
    );
    let config = ok(&text);
    let StoreSettings::Redis {
        url,
        timeout,
        cluster,
        tls,
    } = &config.rate_limit.store
    else {
        panic!("{:?}", config.rate_limit.store)
    };
    assert_eq!(*timeout, Duration::from_millis(50));
    assert!(!cluster);
    assert!(tls.is_none());
    assert_eq!(url.0, "redis://:hunter2@10.0.0.5:6379/2");
    assert_eq!(config.rate_limit.failure_mode, FailureMode::Closed);
    let printed = format!("{config:?}");
    assert!(!printed.contains("hunter2"), "{printed}");
    assert!(printed.contains("redis://***@10.0.0.5:6379/2"), "{printed}");
    let e = err(&text.replace("redis://:hunter2@10.0.0.5:6379/2", "rediss//:hunter2@x"));
    assert!(
        e.contains("rate_limit.redis_url: not a usable Redis URL"),
        "{e}"
    );
    assert!(!e.contains("hunter2"), "{e}");
    // TLS: never with its checks off, and its files only for rediss://.
    let e = err(&text.replace(
        "redis://:hunter2@10.0.0.5:6379/2",
        "rediss://10.0.0.5#insecure",
    ));
    assert!(
        e.contains("rate_limit.redis_url: must not have a #fragment"),
        "{e}"
    );
    let e = err(&format!(
        "{text}redis_tls = {{ ca = \"/nonexistent/ca.pem\" }}\n"
    ));
    assert!(
        e.contains("rate_limit.redis_tls: is for a rediss:// redis_url"),
        "{e}"
    );
    let e = err(&format!(
        "{}redis_tls = {{ ca = \"/nonexistent/ca.pem\" }}\n",
        text.replace("redis://", "rediss://")
    ));
    assert!(
        e.contains("rate_limit.redis_tls.ca: cannot read /nonexistent/ca.pem"),
        "{e}"
    );
}

#[test]
fn syntax_errors_have_a_position() {
    let e = err("[gateway\nlisten = 1");
    assert!(e.starts_with("t.toml:1:9: "), "{e}");
}

#[test]
fn environment_overrides_win_and_their_errors_name_the_variable() {
    let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let config = parse(
        GOOD,
        "t.toml",
        env("TIDEGATE__GATEWAY__LISTEN", "127.0.0.1:9000"),
    )
    .unwrap();
    assert_eq!(config.gateway.listen.port(), 9000);
    let config = parse(
        GOOD,
        "t.toml",
        env("TIDEGATE__UPSTREAMS__1__POLICY__RETRY__MAX_ATTEMPTS", "5"),
    )
    .unwrap();
    assert_eq!(config.upstreams[1].policy.retry.max_attempts, 5);
    let e: ConfigError = parse(
        GOOD,
        "t.toml",
        env("TIDEGATE__GATEWAY__MAX_CONNECTIONS", "lots"),
    )
    .unwrap_err();
    assert_eq!(e.location, "env TIDEGATE__GATEWAY__MAX_CONNECTIONS");
    assert_eq!(e.key, "gateway.max_connections");
    let e = parse(GOOD, "t.toml", env("TIDEGATE__UPSTREAMS__7__NAME", "x")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "env TIDEGATE__UPSTREAMS__7__NAME: upstreams[7].name: `upstreams` has no element 7"
    );
}

#[test]
fn the_effective_config_fills_in_the_defaults_the_code_applies() {
    // A file that sets nothing gets the built-in defaults; its effective
    // JSON, read back as a config, must give the very same settings.
    let bare = ok("[[upstreams]]\nname = \"a\"\nendpoints = [\"http://127.0.0.1:1\"]\n");
    let effective = bare.effective.clone();
    let gateway: GatewaySettings = serde_json::from_value(effective["gateway"].clone()).unwrap();
    assert_eq!(gateway, GatewaySettings::default());
    let policy: PolicyConfig =
        serde_json::from_value(effective["upstreams"][0]["policy"].clone()).unwrap();
    assert_eq!(policy, PolicyConfig::default());
    assert_eq!(bare.upstreams[0].policy, PolicyConfig::default());
    assert_eq!(
        effective["alerts"]["max_attempts"],
        bare.alerts.max_attempts
    );
    assert_eq!(effective["alerts"]["timeout"], "5s");
    assert_eq!(effective["gateway"]["max_connections"], 10_000);
    let policy = &effective["upstreams"][0]["policy"];
    assert_eq!(policy["circuit_breaker"]["open_duration"], "60s");
    assert_eq!(policy["retry"]["jitter"], "full");
    assert_eq!(policy["bulkhead"]["max_queued"], 200);

    // Own keys win over the defaults, key by key.
    let merged = ok(GOOD).effective;
    assert_eq!(merged["upstreams"][0]["policy"]["retry"]["max_attempts"], 2);
    assert_eq!(
        merged["upstreams"][0]["policy"]["retry"]["base_delay"],
        "50ms"
    );
    assert_eq!(merged["upstreams"][1]["policy"]["timeout"], "2s");
}

#[test]
fn the_effective_config_shows_no_secret() {
    let text = r#"
[gateway]
internal_token_env = "INTERNAL"
admin_token_env = "ADMIN"
[[upstreams]]
name = "a"
endpoints = ["http://127.0.0.1:1"]
[rate_limit]
store = "redis"
redis_url = "redis://:hunter2@127.0.0.1:6379/0"
[[rate_limit.tiers]]
name = "free"
requests_per_minute = 10
[[api_keys]]
id = "team-a"
key_sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
tier = "free"
[alerts]
webhooks = ["http://127.0.0.1:9/hooks?token=s3cret"]
"#;
    let effective = ok(text).effective.to_string();
    for secret in ["hunter2", "9f86d081", "s3cret"] {
        assert!(!effective.contains(secret), "{secret} in {effective}");
    }
    for kept in [
        "INTERNAL",
        "ADMIN",
        "127.0.0.1:6379",
        "http://127.0.0.1:9/hooks?[redacted]",
    ] {
        assert!(effective.contains(kept), "{kept} not in {effective}");
    }
}

#[test]
fn alerts_are_typed_and_checked() {
    let config = ok("[alerts]\nwebhooks = [\"http://127.0.0.1:9/a\"]\nmax_attempts = 2\n");
    assert_eq!(config.alerts.webhooks[0].uri, "http://127.0.0.1:9/a");
    assert_eq!(config.alerts.max_attempts, 2);
    assert_eq!(config.alerts.timeout, Duration::from_secs(5));
    // https receivers are checked against the system's roots, on 443
    // unless the URL names a port.
    let config = ok("[alerts]\nwebhooks = [\"https://hooks.example/x\"]\n");
    assert_eq!(
        config.alerts.webhooks[0].to.authority(),
        "hooks.example:443"
    );
    for (text, expected) in [
        (
            "[alerts]\nwebhooks = [\"ftp://x/\"]",
            "alerts.webhooks[0]: must start with http:// or https://",
        ),
        (
            "[alerts]\nwebhooks = [\"http://u:p@x/\"]",
            "alerts.webhooks[0]: needs a host, and no user or password",
        ),
        (
            "[alerts]\nmax_attempts = 0",
            "alerts.max_attempts: must be at least 1",
        ),
        (
            "[alerts]\nretries = 3",
            "alerts.retries: unknown field `retries`",
        ),
        (
            "[gateway]\nadmin_token_env = \"\"",
            "gateway.admin_token_env: must be an environment variable name",
        ),
    ] {
        let e = err(text);
        assert!(e.contains(expected), "{text:?}: {e}");
    }
}

#[test]
fn protocols_grpc_checks_and_outlier_detection_by_default() {
    let config = ok(&GOOD
        .replace("name = \"kb\"", "name = \"kb\"\nprotocol = \"http2\"")
        .replace(
            "path = \"/healthz\"",
            "kind = \"grpc\"\nservice = \"kb.v1\"",
        ));
    let kb = &config.upstreams[0];
    assert!(kb.protocol.is_http2());
    let check = kb.health_check.as_ref().unwrap();
    assert_eq!(check.kind, tidegate_gateway::config::HealthCheckKind::Grpc);
    assert_eq!(check.service.as_deref(), Some("kb.v1"));
    // Two endpoints: outlier detection is on; one: nothing to eject.
    assert_eq!(kb.outlier_detection, Some(Default::default()));
    assert_eq!(config.upstreams[1].outlier_detection, None);
    assert!(!config.upstreams[1].protocol.is_http2());
    let off = ok(&GOOD.replace(
        "[upstreams.health_check]",
        "[upstreams.outlier_detection]\nenabled = false\n[upstreams.health_check]",
    ));
    assert_eq!(off.upstreams[0].outlier_detection, None);
}

#[test]
fn events_are_typed_and_their_errors_name_the_key() {
    let events = |extra: &str| format!("{GOOD}\n[events]\npath = \"e.db\"\n{extra}\n");
    let config = ok(&events(
        "[[events.topics]]\nname = \"content\"\nmax_age = \"7d\"\n\
         [[events.subscriptions]]\nname = \"analytics\"\ntopic = \"content\"\ntypes = [\"Uploaded\"]\n\
         push = { upstream = \"kb\", path = \"/events\", mode = \"structured\" }\nordering = \"key\"\n\
         backoff = { base_delay = \"2s\", max_delay = \"1m\" }",
    ));
    let settings = config.events.expect("[events] is there");
    assert_eq!(
        settings.listen.to_string(),
        "127.0.0.1:9902",
        "loopback by default"
    );
    assert_eq!(settings.dedup_window, Duration::from_secs(120));
    assert_eq!(
        settings.topics[0].max_age,
        Some(Duration::from_secs(7 * 86400))
    );
    let sub = &settings.subscriptions[0];
    assert_eq!(sub.config.ordering, tidegate_events::Ordering::Key);
    assert_eq!(sub.config.backoff.base_delay, Duration::from_secs(2));
    assert_eq!(sub.config.dead_letter_topic(), "content.dead");
    let push = sub.push.as_ref().unwrap();
    assert_eq!(
        (push.upstream.as_str(), push.mode),
        ("kb", tidegate_gateway::config::PushMode::Structured)
    );
    assert!(ok(GOOD).events.is_none(), "no [events], no events listener");
    let on_nats = ok(&format!(
        "{GOOD}\n[events]\nstore = \"nats\"\nnats_url = \"nats://a:4222, nats://b:4222\"\n\
         nats_credentials_env = \"NATS_CREDS\"\nnats_replicas = 3\n"
    ));
    assert_eq!(
        on_nats.events.unwrap().store,
        tidegate_gateway::config::EventStore::Nats {
            url: "nats://a:4222, nats://b:4222".into(),
            credentials_env: Some("NATS_CREDS".into()),
            replicas: 3,
            tls: None,
        }
    );

    let sub = |extra: &str| {
        events(&format!(
            "[[events.subscriptions]]\nname = \"s\"\ntopic = \"t\"\n{extra}"
        ))
    };
    let nats = |extra: &str| format!("{GOOD}\n[events]\nstore = \"nats\"\n{extra}\n");
    for (text, says) in [
        (events("colour = \"blue\""), "t.toml:"),
        (
            events("store = \"kafka\""),
            "events.store: unknown store `kafka`",
        ),
        (nats(""), "events.store: store = \"nats\" needs nats_url"),
        (
            nats("nats_url = \"http://x:4222\""),
            "events.nats_url: must be nats://host:port",
        ),
        (
            nats("nats_url = \"nats://me:secret@x:4222\""),
            "events.nats_url: must be nats://host:port",
        ),
        (
            nats("nats_url = \"tls://x:4222\"\nnats_tls = { ca = \"/nonexistent/ca.pem\" }"),
            "events.nats_tls.ca: cannot read /nonexistent/ca.pem",
        ),
        (
            events("nats_tls = { ca = \"/nonexistent/ca.pem\" }"),
            "events.nats_tls: applies only with store = \"nats\"",
        ),
        (
            nats("nats_url = \"nats://x:4222\"\nnats_replicas = 9"),
            "events.nats_replicas: must be from 1 to 5",
        ),
        (
            nats("nats_url = \"nats://x:4222\"\npath = \"e.db\""),
            "events.path: applies only with store = \"sqlite\"",
        ),
        (
            events("nats_url = \"nats://x\""),
            "events.nats_url: applies only with store = \"nats\"",
        ),
        (
            events("[[events.topics]]\nname = \"a b\""),
            "events.topics[0].name: must be 1 to 64",
        ),
        (
            events("[[events.topics]]\nname = \"a\"\nmax_age = \"0s\""),
            "events.topics[0].max_age: must be greater than 0",
        ),
        (
            sub("push = { upstream = \"nope\", path = \"/e\" }"),
            "events.subscriptions[0].push.upstream: no upstream named `nope`",
        ),
        (
            sub("push = { upstream = \"kb\", path = \"e\" }"),
            "events.subscriptions[0].push.path: must be a path",
        ),
        (
            sub("max_in_flight = 0"),
            "events.subscriptions[0].max_in_flight: must be at least 1",
        ),
        (
            sub("ack_wait = \"0s\""),
            "events.subscriptions[0].ack_wait: must be greater than 0",
        ),
        (
            sub("dead_letter_topic = \"t\""),
            "events.subscriptions[0].dead_letter_topic: must be another topic",
        ),
        (
            sub("ordering = \"total\""),
            "events.subscriptions[0].ordering",
        ),
        (
            sub("backoff = { base_delay = \"1m\", max_delay = \"1s\" }"),
            "events.subscriptions[0].backoff: base_delay must not exceed max_delay",
        ),
        (
            format!(
                "{GOOD}\n[[api_keys]]\nid = \"a\"\nkey_sha256 = \"{}\"\ntopics = [\"a/b\"]\n",
                "0".repeat(64)
            ),
            "api_keys[0].topics[0]: must be 1 to 64",
        ),
    ] {
        let error = err(&text);
        assert!(error.contains(says), "{error}\n  should say: {says}");
        assert!(error.starts_with("t.toml:"), "{error}");
    }
}

const COMPOSED: &str = r#"
[[upstreams]]
name = "auth"
endpoints = ["http://127.0.0.1:8003"]
[upstreams.policy]
deadline = "4s"

[[upstreams]]
name = "content"
endpoints = ["http://127.0.0.1:8004"]
[upstreams.policy]
deadline = "7s"

[[routes]]
name = "web"
path_prefix = "/bff/web"
compose = [
  { name = "user", upstream = "auth", path = "/users/{header.x-user-id}" },
  { name = "feed", upstream = "content", path = "/feed{path}?n={query.n}", required = false, fields = ["id", "author.name"], fallback = { kind = "static", body = "[]" } },
]
"#;

#[test]
fn a_composition_route_is_typed() {
    let config = ok(COMPOSED);
    let route = &config.routes[0];
    let Target::Compose(composition) = &route.target else {
        panic!("{:?}", route.target);
    };
    assert_eq!(composition.parts.len(), 2);
    assert!(composition.parts[0].required);
    assert!(!composition.parts[1].required);
    assert_eq!(
        composition.parts[1].fields,
        vec![
            vec!["id".to_owned()],
            vec!["author".to_owned(), "name".to_owned()]
        ]
    );
    assert_eq!(
        composition.deadline,
        Duration::from_secs(7),
        "by default the longest deadline of its parts' upstreams"
    );
    assert_eq!(route.methods, vec![http::Method::GET, http::Method::HEAD]);
    let with_deadline = ok(&COMPOSED.replace(
        "path_prefix = \"/bff/web\"",
        "path_prefix = \"/bff/web\"\ndeadline = \"800ms\"",
    ));
    let Target::Compose(composition) = &with_deadline.routes[0].target else {
        panic!()
    };
    assert_eq!(composition.deadline, Duration::from_millis(800));
}

#[test]
fn composition_errors_name_their_key() {
    let cases = [
        (
            COMPOSED.replace("{header.x-user-id}", "{body.id}"),
            "t.toml:18:39: routes[0].compose[0].path: unknown placeholder `{body.id}`: use {header.NAME}, {query.NAME} or {path}",
        ),
        (
            COMPOSED.replace("upstream = \"auth\"", "upstream = \"nope\""),
            "t.toml:18:20: routes[0].compose[0].upstream: no upstream named `nope`",
        ),
        (
            COMPOSED.replace("name = \"feed\"", "name = \"user\""),
            "t.toml:19:5: routes[0].compose[1].name: duplicate part name `user`",
        ),
        (
            COMPOSED.replace("body = \"[]\"", "body = \"[\""),
            "t.toml:19:156: routes[0].compose[1].fallback.body: must be JSON",
        ),
        (
            COMPOSED.replace(
                "fallback = { kind = \"static\", body = \"[]\" }",
                "fallback = { kind = \"stale\" }",
            ),
            "t.toml:19:126: routes[0].compose[1].fallback: a part's fallback is `static` (a JSON value) or `upstream`",
        ),
        (
            COMPOSED.replace("\"author.name\"", "\"author.\""),
            "t.toml:19:110: routes[0].compose[1].fields[1]: a field is a name, or names joined by `.` (`author.name`)",
        ),
        (
            COMPOSED.replace(
                "path_prefix = \"/bff/web\"",
                "path_prefix = \"/bff/web\"\nupstream = \"auth\"",
            ),
            "t.toml:18:1: routes[0].compose: a route has one of `upstream`, `split` or `compose`",
        ),
        (
            COMPOSED.replace(
                "path_prefix = \"/bff/web\"",
                "path_prefix = \"/bff/web\"\nmethods = [\"POST\"]",
            ),
            "t.toml:17:12: routes[0].methods[0]: a composition route answers GET and HEAD",
        ),
        (
            COMPOSED.replace(
                "path_prefix = \"/bff/web\"",
                "path_prefix = \"/bff/web\"\nstrip_prefix = true",
            ),
            "t.toml:17:1: routes[0].strip_prefix: not on a composition route (its parts are GETs of their own paths, each with its own `fallback`)",
        ),
        (
            GOOD.replace("upstream = \"kb\"", "upstream = \"kb\"\ndeadline = \"1s\""),
            "t.toml:32:1: routes[0].deadline: `deadline` bounds a composition route; a route to one upstream has its upstream's `policy.deadline`",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(err(&text), want);
    }
}

#[test]
fn tidegate_check_refuses_schema_versions_that_break_the_evolution_rules() {
    let dir = std::env::temp_dir().join(format!("tidegate-config-schemas-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let v1 = r#"{"type":"object","required":["id"],"properties":{
        "id":{"type":"string"},"size":{"type":"integer"},"old":{"type":"string","deprecated":true}}}"#;
    let cases = [
        // Fine: optional field added, deprecated field removed.
        (r#"{"type":"object","required":["id"],"properties":{"id":{"type":"string"},"size":{"type":"integer"},"tag":{"type":"string"}}}"#, None),
        (
            r#"{"type":"object","required":["id","owner"],"properties":{"id":{"type":"string"},"size":{"type":"integer"},"old":{"type":"string"},"owner":{"type":"string"}}}"#,
            Some("field `owner` is added as required without a default from v1.json to v2.json: a field may be added only as optional or with a default"),
        ),
        (
            r#"{"type":"object","required":["id"],"properties":{"id":{"type":"string"},"old":{"type":"string"}}}"#,
            Some("field `size` is removed without being marked `deprecated` first from v1.json to v2.json: a field is removed only after a version that marks it `deprecated`"),
        ),
        (
            r#"{"type":"object","required":["id"],"properties":{"id":{"type":"string"},"size":{"type":"string"},"old":{"type":"string"}}}"#,
            Some("field `size` changes type from integer to string from v1.json to v2.json: a type change (or a rename) needs a new event type"),
        ),
        (r#"{"type": 7}"#, Some("is not a usable JSON Schema")),
        ("{", Some("is not JSON")),
    ];
    std::fs::write(dir.join("v1.json"), v1).unwrap();
    let config_file = dir.join("tidegate.toml");
    let text = "[events]\npath = \"e.db\"\n[[events.schemas]]\ntopic = \"content\"\ntype = \"Uploaded\"\nversions = [\"v1.json\", \"v2.json\"]\n";
    for (v2, want) in cases {
        std::fs::write(dir.join("v2.json"), v2).unwrap();
        let file = config_file.display().to_string();
        match (parse(text, &file, []), want) {
            (Ok(config), None) => {
                let schemas = &config.events.unwrap().schemas;
                assert_eq!(schemas[0].versions.len(), 2);
                assert_eq!(schemas[0].versions[1].file, "v2.json", "named as written");
            }
            (Err(e), Some(want)) => {
                let e = e.to_string();
                assert!(e.starts_with(&format!("{file}:6:")), "{e}");
                assert!(e.contains("events.schemas[0].versions[1]: "), "{e}");
                assert!(e.contains(want), "{e}\nwants: {want}");
            }
            (got, want) => panic!("{v2}: {:?}, wanted {want:?}", got.map(drop)),
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

const SAGA: &str = r#"
[[upstreams]]
name = "inventory"
endpoints = ["http://127.0.0.1:8005"]

[events]
path = "e.db"

[[sagas]]
name = "checkout"
[[sagas.steps]]
name = "reserve"
action = { upstream = "inventory", path = "/reservations", body = { items = "{input.items}" } }
compensate = { upstream = "inventory", method = "DELETE", path = "/reservations/{steps.reserve.response.id}" }
timeout = "2s"
[[sagas.steps]]
name = "charge"
action = { upstream = "inventory", path = "/charges/{steps.reserve.response.id}" }
"#;

#[test]
fn a_saga_is_typed_and_its_errors_name_their_key() {
    let config = ok(SAGA);
    let saga = &config.sagas[0];
    assert_eq!(saga.steps.len(), 2);
    assert_eq!(saga.steps[0].timeout, Some(Duration::from_secs(2)));
    assert_eq!(
        saga.steps[0].compensate.as_ref().unwrap().method,
        http::Method::DELETE
    );
    assert_eq!(
        saga.steps[1].action.method,
        http::Method::POST,
        "POST unless said"
    );
    assert_eq!(saga.compensation.max_attempts, 5);
    let cases = [
        (
            SAGA.replace("[events]\npath = \"e.db\"", ""),
            "t.toml:8:3: sagas: sagas are kept in the event store: add an [events] table",
        ),
        (
            SAGA.replace("/charges/{steps.reserve.response.id}", "/charges/{steps.ship.response.id}"),
            "t.toml:18:36: sagas[0].steps[1].action.path: `{steps.ship.response.id}`: there is no step `ship`",
        ),
        (
            SAGA.replace(
                "/reservations\", body",
                "/reservations/{steps.charge.response.id}\", body",
            ),
            "t.toml:13:36: sagas[0].steps[0].action.path: `{steps.charge.response.id}`: step `charge` has not run by then (a step sees the responses of the steps before it; a compensation, its own step's too)",
        ),
        (
            SAGA.replace("{input.items}", "{output.items}"),
            "t.toml:13:60: sagas[0].steps[0].action.body: `{output.items}` is not a reference: use {input}, {input.KEY}, {steps.STEP.response.KEY} or {saga.id}",
        ),
        (
            SAGA.replace("method = \"DELETE\"", "method = \"DE LETE\""),
            "t.toml:14:40: sagas[0].steps[0].compensate.method: `DE LETE` is not an HTTP method",
        ),
        (
            SAGA.replace("name = \"charge\"", "name = \"reserve\""),
            "t.toml:17:1: sagas[0].steps[1].name: duplicate step name `reserve`",
        ),
        (
            SAGA.replace("name = \"checkout\"", "name = \"checkout\"\ncompensation = { max_attempts = 0 }"),
            "t.toml:11:18: sagas[0].compensation.max_attempts: must be at least 1",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(err(&text), want);
    }
}

#[test]
fn telemetry_is_typed_and_its_errors_name_the_key() {
    let config = ok(&format!(
        "{GOOD}\n[telemetry]\notlp_endpoint = \"http://collector:4318/\"\nsample_ratio = 0.25\n"
    ));
    let telemetry = config.telemetry.unwrap();
    assert_eq!(telemetry.path, "/v1/traces");
    assert_eq!(telemetry.to.authority(), "collector:4318");
    assert_eq!(telemetry.host, "collector:4318");
    assert_eq!(telemetry.service_name, "tidegate");
    assert_eq!(telemetry.sample_ratio, 0.25);
    assert_eq!((telemetry.max_queue, telemetry.batch_size), (2048, 512));
    assert!(ok(GOOD).telemetry.is_none(), "no [telemetry], no spans");
    let prefixed = ok(&format!(
        "{GOOD}\n[telemetry]\notlp_endpoint = \"https://otel.example/base\"\n"
    ));
    let telemetry = prefixed.telemetry.unwrap();
    assert_eq!(telemetry.path, "/base/v1/traces");
    assert_eq!(telemetry.to.authority(), "otel.example:443");
    for (body, says) in [
        ("", "telemetry.otlp_endpoint: is needed"),
        (
            "otlp_endpoint = \"grpc://c:4317\"",
            "telemetry.otlp_endpoint: must start with http:// or https://",
        ),
        (
            "otlp_endpoint = \"http://c:4318\"\nsample_ratio = 1.5",
            "telemetry.sample_ratio: must be from 0 to 1",
        ),
        (
            "otlp_endpoint = \"http://c:4318\"\nmax_queue = 10\nbatch_size = 20",
            "telemetry.batch_size: must be at least 1 and at most max_queue",
        ),
        (
            "otlp_endpoint = \"http://c:4318\"\nexport_interval = \"0s\"",
            "telemetry.export_interval: must be greater than 0",
        ),
        (
            "otlp_endpoint = \"http://c:4318\"\nspan_limit = 3",
            "unknown field `span_limit`",
        ),
    ] {
        let e = err(&format!("{GOOD}\n[telemetry]\n{body}\n"));
        assert!(e.contains(says), "{e}\nwanted …{says}");
    }
}
