//! The command line: exit codes and messages.

use std::process::Command;

mod common;

use common::{http_get, temp_dir, tiny_upstream, Serve};

fn tidegate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(args)
        .output()
        .expect("run tidegate")
}

#[test]
fn check_accepts_a_good_config_and_names_the_problem_in_a_bad_one() {
    let dir = temp_dir("cli");
    let good = dir.join("good.toml");
    std::fs::write(
        &good,
        "[[upstreams]]\nname = \"a\"\nendpoints = [\"http://127.0.0.1:9\"]\n[[routes]]\nname = \"r\"\npath_prefix = \"/\"\nupstream = \"a\"\n",
    )
    .unwrap();
    let out = tidegate(&["check", "--config", good.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = dir.join("bad.toml");
    std::fs::write(&bad, "[gateway]\nheader_read_timeout = \"soon\"\n").unwrap();
    let out = tidegate(&["check", "--config", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(&format!(
            "{}:2:1: gateway.header_read_timeout: ",
            bad.display()
        )),
        "{stderr}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(tidegate(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(tidegate(&["check"]).status.code(), Some(2));
    assert!(tidegate(&["--version"]).status.success());
    let out = tidegate(&["serve", "--workers", "0", "--config", "x.toml"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("'--workers <N>'"), "{stderr}");
}

#[test]
fn every_command_has_its_help() {
    for (command, names) in [
        ("serve", &["--config", "--log-format", "--workers"][..]),
        ("check", &["--config"]),
        ("demo", &["--quick", "--listen", "--admin"]),
        ("status", &["--admin"]),
        ("events", &["--admin", "tail"]),
    ] {
        let out = tidegate(&[command, "--help"]);
        assert!(out.status.success(), "{command} --help");
        let help = String::from_utf8_lossy(&out.stdout);
        for name in names {
            assert!(help.contains(name), "{command} --help lacks {name}: {help}");
        }
    }
}

#[test]
fn serve_logs_json_access_lines_reloads_on_sighup_and_drains_on_sigterm() {
    let upstream = tiny_upstream();
    let dir = temp_dir("serve");
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        format!(
            "[gateway]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
             [[upstreams]]\nname = \"svc\"\nendpoints = [\"http://{upstream}\"]\n\
             [[routes]]\nname = \"api\"\npath_prefix = \"/api\"\nupstream = \"svc\"\n"
        ),
    )
    .unwrap();
    let mut serve = Serve::start(&config);
    let answer = http_get(&serve.addr, "/api/x", "x-correlation-id: cli-1\r\n");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let access = serve.next_event(&|e| e["target"] == "tidegate::access");
    let fields = &access["fields"];
    assert_eq!(fields["request_id"], "cli-1");
    assert_eq!(fields["route"], "api");
    assert_eq!(fields["upstream"], "svc");
    assert_eq!(fields["attempts"], 1);
    assert_eq!(fields["status"], 200);
    assert!(fields["duration_ms"].as_f64().is_some(), "{access}");
    assert!(fields["ttfb_ms"].as_f64().is_some(), "{access}");
    assert_eq!(fields["complete"], true, "{access}");

    // SIGHUP reloads the file (a change is also seen by polling; either way
    // one reload is logged).
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        format!("{text}[[routes]]\nname = \"more\"\npath_prefix = \"/more\"\nupstream = \"svc\"\n"),
    )
    .unwrap();
    serve.signal("HUP");
    serve.next_event(&|e| e["fields"]["message"] == "config reloaded");
    let answer = http_get(&serve.addr, "/more/x", "");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    serve.signal("TERM");
    serve.next_event(&|e| e["fields"]["message"] == "shutting down: draining in-flight requests");
    serve.stop_after_signal();
    std::fs::remove_dir_all(&dir).unwrap();
}
