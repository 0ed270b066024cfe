//! Route matching: the longest path prefix wins; among equal prefixes, the
//! route with more conditions (methods, headers), then the first declared.

use std::sync::Arc;

use http::request::Parts;

use crate::config::{LimitKey, RouteConfig, Target};
use crate::proxy::fallback::StaleCache;

/// A route, its name as a shared metric label, and its run-time state.
#[derive(Debug)]
pub struct Route {
    /// The route as configured.
    pub config: RouteConfig,
    /// `config.name`, shared so metrics need no copy per request.
    pub label: Arc<String>,
    /// Its last good answers, when its fallback is `stale`.
    pub stale: Option<Arc<StaleCache>>,
    /// Whether serving it reads the request's fields beyond those the
    /// gateway always looks at (see [`crate::http::fields::Arrived`]): a
    /// composition's calls take them, a limit by header and the stale
    /// cache's key read them.
    pub reads_fields: bool,
    /// Whether it admits any request without a valid API key as it is:
    /// no key required, no tier, limit or injected fault.
    pub admits_anonymous: bool,
}

/// Routes in matching order.
#[derive(Debug)]
pub struct Router {
    routes: Vec<Route>,
    /// Whether some route matches on fields.
    matches_fields: bool,
}

impl Router {
    /// Orders `routes` for matching; `stale` gives each route its cache of
    /// last good answers, if it has one.
    pub fn new(
        mut routes: Vec<RouteConfig>,
        mut stale: impl FnMut(&RouteConfig) -> Option<Arc<StaleCache>>,
    ) -> Self {
        // A stable sort keeps file order among equals.
        routes.sort_by_key(|r| {
            let conditions = usize::from(!r.methods.is_empty()) + r.headers.len();
            std::cmp::Reverse((r.path_prefix.len(), conditions))
        });
        let routes = routes
            .into_iter()
            .map(|config| {
                let stale = stale(&config);
                Route {
                    label: Arc::new(config.name.clone()),
                    reads_fields: stale.is_some()
                        || matches!(config.target, Target::Compose(_))
                        || config
                            .rate_limit
                            .as_ref()
                            .is_some_and(|limit| matches!(limit.key, LimitKey::Header(_))),
                    admits_anonymous: !config.require_api_key
                        && config.tiers.is_empty()
                        && config.rate_limit.is_none()
                        && config.fault.is_none(),
                    stale,
                    config,
                }
            })
            .collect::<Vec<_>>();
        let matches_fields = routes.iter().any(|r| !r.config.headers.is_empty());
        Router {
            routes,
            matches_fields,
        }
    }

    /// Whether matching a request reads its fields.
    pub fn matches_fields(&self) -> bool {
        self.matches_fields
    }

    /// Every route, in matching order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The route for a request, if any.
    pub fn route(&self, parts: &Parts) -> Option<&Route> {
        let path = parts.uri.path();
        self.routes.iter().find(|Route { config: r, .. }| {
            prefix_matches(&r.path_prefix, path)
                && (r.methods.is_empty() || r.methods.contains(&parts.method))
                && r.headers
                    .iter()
                    .all(|(name, value)| parts.headers.get_all(name).iter().any(|v| v == value))
        })
    }
}

/// `/api` matches `/api`, `/api/x`, not `/apis`; `/api/` and `/` match what starts with them.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => prefix.ends_with('/') || rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The path sent upstream when the route strips its prefix: never empty.
pub fn strip(prefix: &str, path: &str) -> String {
    let rest = path
        .strip_prefix(prefix.trim_end_matches('/'))
        .unwrap_or(path);
    if rest.starts_with('/') {
        rest.to_owned()
    } else {
        format!("/{rest}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_at_segment_boundaries() {
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1"));
        assert!(!prefix_matches("/api", "/apis"));
        assert!(prefix_matches("/api/", "/api/x"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn stripping_leaves_a_path() {
        assert_eq!(strip("/api", "/api"), "/");
        assert_eq!(strip("/api", "/api/v1/x"), "/v1/x");
        assert_eq!(strip("/api/", "/api/v1"), "/v1");
        assert_eq!(strip("/", "/x"), "/x");
    }
}
