//! The command line: exit codes and messages.

use std::process::Command;

fn tidegate(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tidegate"))
        .args(args)
        .output()
        .expect("run tidegate")
}

#[test]
fn check_accepts_a_good_config_and_names_the_problem_in_a_bad_one() {
    let dir = std::env::temp_dir().join(format!("tidegate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
}
