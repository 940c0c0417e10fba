//! The command line's contract with scripts: exit codes by what failed,
//! a broken pipe as success, each cause printed once, logging refused
//! when its variables are malformed.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use crate::helpers::*;

#[tokio::test]
async fn exit_codes_say_what_failed_and_each_cause_is_printed_once() {
    let app = spawn_app().await;
    // PostgreSQL down: its own code, 4 (not NATS's 3)
    let port = free_port();
    let out = app
        .nats
        .cli(Who::Service)
        .args(["projections", "status", "--database-url"])
        .arg(format!("postgres://flowledger@127.0.0.1:{port}/none"))
        .output()
        .expect("flowledger runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    let message = stderr
        .lines()
        .find(|l| l.starts_with("flowledger: "))
        .unwrap_or_else(|| panic!("an error line: {stderr}"));
    let parts: Vec<&str> = message["flowledger: ".len()..].split(": ").collect();
    for (i, p) in parts.iter().enumerate() {
        assert!(
            !parts[..i].iter().any(|q| q.contains(p)),
            "{p:?} is printed twice: {message}"
        );
    }
    assert!(!message.contains("PostgreSQL unreachable"), "{message}");

    // NATS down: 3
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowledger"))
        .args(["--nats-url", &format!("nats://127.0.0.1:{}", free_port())])
        .args(["--user", "flowledger", "--password", "x", "audit", "digest"])
        .output()
        .expect("flowledger runs");
    assert_eq!(
        out.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // a malformed log filter or format: usage, 2, naming the variable
    for (var, value) in [
        ("FLOWLEDGER_LOG", "info,flowledger=loud"),
        ("FLOWLEDGER_LOG_FORMAT", "xml"),
    ] {
        let out = app
            .nats
            .cli(Who::Service)
            .args(["audit", "digest"])
            .env(var, value)
            .output()
            .expect("flowledger runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{var}: {stderr}");
        assert!(stderr.contains(var), "{stderr}");
    }
}

#[tokio::test]
async fn a_reader_that_stops_early_is_not_a_failure() {
    let app = spawn_app().await;
    for i in 0..200 {
        app.submit(&format!("pipe-{i}"), &format!("pipe-cmd-{i}"))
            .await;
    }
    let mut child = app
        .nats
        .cli(Who::Service)
        .args(["audit", "replay"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("flowledger runs");
    // `| head -1`: read one line, then close the pipe
    let mut first = String::new();
    let stdout = child.stdout.take().expect("piped");
    BufReader::new(stdout)
        .read_line(&mut first)
        .expect("a line");
    assert!(first.contains("\"stream_seq\""), "{first}");
    let out = child.wait_with_output().expect("it ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("Broken pipe"), "{stderr}");

    // any command's output: the reader is gone before it prints
    let mut c = app.nats.cli(Who::Service);
    let envs: Vec<(String, String)> = c
        .get_envs()
        .filter_map(|(k, v)| Some((k.to_str()?.to_string(), v?.to_str()?.to_string())))
        .collect();
    c = std::process::Command::new("bash");
    c.arg("-c").arg(format!(
        "(sleep 0.5; exec {} audit digest) | true; echo \"status=${{PIPESTATUS[0]}}\"",
        env!("CARGO_BIN_EXE_flowledger")
    ));
    for (k, v) in envs {
        c.env(k, v);
    }
    let out = c.output().expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("status=0"), "{stdout}{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn serve_check_config_connects_to_nothing_and_names_the_bad_setting() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let run = |config: &std::path::Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_flowledger"))
            // nothing listens there: a connection would fail
            .args(["--nats-url", &format!("nats://127.0.0.1:{}", free_port())])
            .args(["serve", "--check-config", "--registry"])
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/workflows/registry.json"
            ))
            .arg("--config")
            .arg(config)
            .env("FLOWLEDGER_CALLBACK_KEY", "ab".repeat(32))
            .env_remove("FLOWLEDGER_CHECKPOINT_SIGNING_KEY")
            .output()
            .expect("flowledger runs")
    };
    let good = run(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/config/example.toml"
    )));
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert_eq!(
        good.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&good.stderr)
    );
    assert!(stdout.contains("configuration ok"), "{stdout}");
    assert!(stdout.contains("(3 workflows)"), "{stdout}");
    assert!(stdout.contains("callback signing key: on"), "{stdout}");
    assert!(!stdout.contains(&"ab".repeat(32)), "{stdout}");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[memory]\nchunk_chars = 7\n").unwrap();
    let out = run(&bad);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("memory.chunk_chars"), "{stderr}");
}

#[test]
fn serve_check_config_layers_environment_overrides_and_reads_secrets_from_files() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let key_file = dir.path().join("callback-key");
    std::fs::write(&key_file, format!("{}\n", "cd".repeat(32))).unwrap();
    let seed_file = dir.path().join("checkpoint-seed");
    std::fs::write(&seed_file, format!("{}\n", "9".repeat(64))).unwrap();
    let db_file = dir.path().join("database-url");
    std::fs::write(&db_file, "postgres://flowledger:pw@127.0.0.1:1/none\n").unwrap();
    let run = |envs: &[(&str, &std::ffi::OsStr)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_flowledger"));
        // nothing listens there: a connection would fail
        c.args(["--nats-url", &format!("nats://127.0.0.1:{}", free_port())])
            .args(["serve", "--check-config", "--registry"])
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/workflows/registry.json"
            ))
            .arg("--config")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"))
            .env_remove("FLOWLEDGER_CALLBACK_KEY")
            .env_remove("DATABASE_URL")
            .env_remove("FLOWLEDGER_CHECKPOINT_SIGNING_KEY");
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = c.output().expect("flowledger runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, stdout, stderr) = run(&[
        ("FLOWLEDGER_HANDLER__ENABLED", "false".as_ref()),
        ("FLOWLEDGER_CALLBACK_KEY_FILE", key_file.as_os_str()),
        ("DATABASE_URL_FILE", db_file.as_os_str()),
        (
            "FLOWLEDGER_CHECKPOINT_SIGNING_KEY_FILE",
            seed_file.as_os_str(),
        ),
    ]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("checkpoint signing key: on"), "{stdout}");
    assert!(
        stdout.contains("environment overrides: FLOWLEDGER_HANDLER__ENABLED"),
        "{stdout}"
    );
    assert!(
        stdout.contains("job handler: off"),
        "the override turned the handler of the file off: {stdout}"
    );
    assert!(stdout.contains("callback signing key: on"), "{stdout}");
    assert!(stdout.contains("database: given"), "{stdout}");
    assert!(
        !stdout.contains("cdcd") && !stdout.contains("pw@"),
        "{stdout}"
    );

    // a bad value names the variable and what is expected
    let (code, _, stderr) = run(&[("FLOWLEDGER_HANDLER__DRAIN_GRACE_SECONDS", "4000".as_ref())]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("FLOWLEDGER_HANDLER__DRAIN_GRACE_SECONDS") && stderr.contains("0 to 3600"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&[("FLOWLEDGER_HANDLER__ENABLED", "maybe".as_ref())]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("FLOWLEDGER_HANDLER__ENABLED") && stderr.contains("bool"),
        "{stderr}"
    );
    // a secret given twice is refused naming both variables, never the value
    let (code, _, stderr) = run(&[
        ("FLOWLEDGER_CALLBACK_KEY", "ef".repeat(32).as_ref()),
        ("FLOWLEDGER_CALLBACK_KEY_FILE", key_file.as_os_str()),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("FLOWLEDGER_CALLBACK_KEY and FLOWLEDGER_CALLBACK_KEY_FILE"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("efef") && !stderr.contains("cdcd"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&[
        ("DATABASE_URL", "postgres://x@127.0.0.1:1/y".as_ref()),
        ("DATABASE_URL_FILE", db_file.as_os_str()),
    ]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("DATABASE_URL and DATABASE_URL_FILE"),
        "{stderr}"
    );
    let (code, _, stderr) = run(&[(
        "FLOWLEDGER_CALLBACK_KEY_FILE",
        dir.path().join("missing").as_os_str(),
    )]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("FLOWLEDGER_CALLBACK_KEY_FILE="), "{stderr}");
}

#[tokio::test]
async fn the_nats_password_may_come_from_the_file_its_file_variable_names() {
    let app = spawn_app().await;
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("nats-password");
    let digest = |password: &str| {
        std::fs::write(&file, format!("{password}\n")).unwrap();
        let mut cmd = app.nats.cli(Who::Service);
        cmd.args(["audit", "digest"])
            .env_remove("FLOWLEDGER_NATS_PASSWORD")
            .env("FLOWLEDGER_NATS_PASSWORD_FILE", &file);
        let out = cmd.output().expect("flowledger runs");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let password = app
        .nats
        .cli(Who::Service)
        .get_envs()
        .find(|(k, _)| *k == "FLOWLEDGER_NATS_PASSWORD")
        .and_then(|(_, v)| v)
        .map(|v| v.to_string_lossy().to_string())
        .expect("the harness gives the service a password");
    let (code, stderr) = digest(&password);
    assert_eq!(code, Some(0), "the file's password connects: {stderr}");
    let (code, stderr) = digest("not-the-password");
    assert_eq!(code, Some(2), "a refused credential: {stderr}");
    assert!(!stderr.contains("not-the-password"), "{stderr}");
}
