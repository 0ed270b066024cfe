//! `tidegate status`: the admin API's view of the upstreams, as a table.

use std::process::ExitCode;

use anyhow::Context;

use crate::cli::Status;
use crate::demo::fetch;

/// Prints the table of the gateway whose admin API is at `args.admin`.
pub(crate) fn run(args: Status) -> anyhow::Result<ExitCode> {
    let admin = args.admin.trim_end_matches('/');
    let runtime = crate::runtime()?;
    let get = |path: &str| -> anyhow::Result<serde_json::Value> {
        let url = format!("{admin}{path}");
        let (code, body) = runtime
            .block_on(fetch("GET", &url, ""))
            .with_context(|| format!("cannot reach the admin API at {admin}"))?;
        anyhow::ensure!(code == 200, "{url} answered {code}");
        serde_json::from_str(&body).with_context(|| format!("{url} did not answer JSON"))
    };
    let services = get("/status/services")?;
    let timeline = get("/status/timeline")?;
    print!("{}", status_table(&services, &timeline));
    Ok(ExitCode::SUCCESS)
}

/// The dashboard as text: a row per upstream (breaker state, the last
/// minute's traffic, bulkhead, recovery, endpoints) and the latest
/// breaker transitions.
fn status_table(services: &serde_json::Value, timeline: &serde_json::Value) -> String {
    use std::fmt::Write;
    let ms = |v: &serde_json::Value| match v.as_f64() {
        Some(ms) if ms < 10.0 => format!("{ms:.2}ms"),
        Some(ms) if ms < 1000.0 => format!("{ms:.0}ms"),
        Some(ms) => format!("{:.2}s", ms / 1000.0),
        None => "-".to_owned(),
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<20} {:<13} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}  ENDPOINTS",
        "UPSTREAM", "STATE", "REQ/S", "FAILURES", "P50", "P99", "IN-FLIGHT", "BULKHEAD", "MTTR"
    );
    for (name, s) in services["services"].as_object().into_iter().flatten() {
        let traffic = &s["traffic"];
        let endpoints: Vec<String> = s["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let mark = match (e["healthy"] == true, e["ejected"] == true) {
                    (false, _) => "DOWN",
                    (true, true) => "ejected",
                    (true, false) => "up",
                };
                format!("{} {mark}", e["url"].as_str().unwrap_or("?"))
            })
            .collect();
        let bulkhead = match &s["bulkhead"] {
            serde_json::Value::Null => "-".to_owned(),
            b => format!("{}/{}", b["in_flight"], b["max_concurrent"]),
        };
        let mttr = match s["recovery"]["mean_seconds"].as_f64() {
            Some(secs) => format!("{secs:.1}s"),
            None => "-".to_owned(),
        };
        let state = s["state"].as_str().unwrap_or("?").to_uppercase();
        let _ = writeln!(
            out,
            "{:<20} {:<13} {:>7.1} {:>7.1}% {:>8} {:>8} {:>9} {:>9} {:>8}  {}",
            name,
            if state == "DISABLED" {
                "FORCED_CLOSED".to_owned()
            } else {
                state
            },
            traffic["requests_per_second"].as_f64().unwrap_or(0.0),
            traffic["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
            ms(&traffic["p50_ms"]),
            ms(&traffic["p99_ms"]),
            s["in_flight"].to_string(),
            bulkhead,
            mttr,
            endpoints.join(", ")
        );
    }
    let transitions = timeline["transitions"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    if !transitions.is_empty() {
        let _ = writeln!(out, "\nlatest breaker transitions:");
        for t in transitions.iter().rev().take(10) {
            let _ = writeln!(
                out,
                "  {}  {:<20} {} -> {}  ({})",
                t["timestamp"].as_str().unwrap_or("?"),
                t["upstream"].as_str().unwrap_or("?"),
                t["from"].as_str().unwrap_or("?"),
                t["to"].as_str().unwrap_or("?"),
                t["reason"].as_str().unwrap_or("")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::status_table;
    use serde_json::json;

    #[test]
    fn the_status_table_shows_state_traffic_and_recovery() {
        let services = json!({"services": {"billing": {
            "state": "open", "in_flight": 3,
            "traffic": {"requests_per_second": 12.5, "error_rate": 0.25, "p50_ms": 4.2, "p99_ms": 1500.0},
            "bulkhead": {"in_flight": 3, "max_concurrent": 100},
            "recovery": {"mean_seconds": 12.34},
            "endpoints": [{"url": "http://10.0.0.1:80", "healthy": true, "ejected": false},
                          {"url": "http://10.0.0.2:80", "healthy": false, "ejected": false}]
        }}});
        let timeline = json!({"transitions": [{"timestamp": "2026-11-22T10:00:00.000Z",
            "upstream": "billing", "from": "closed", "to": "open", "reason": "5/5 consecutive failures"}]});
        let table = status_table(&services, &timeline);
        let row = table.lines().nth(1).unwrap();
        for cell in [
            "billing",
            "OPEN",
            "12.5",
            "25.0%",
            "4.20ms",
            "1.50s",
            "3/100",
            "12.3s",
            "http://10.0.0.1:80 up",
            "http://10.0.0.2:80 DOWN",
        ] {
            assert!(row.contains(cell), "{cell} not in {row}");
        }
        assert!(
            table.contains("billing              closed -> open  (5/5 consecutive failures)"),
            "{table}"
        );
    }
}
