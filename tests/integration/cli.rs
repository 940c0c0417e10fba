//! The command line's contract with scripts: exit codes by what failed,
//! a broken pipe as success, each cause printed once, logging refused
//! when its variables are malformed; the commands over a running serve's
//! HTTP API (jobs, approvals, the kill-switch) with their output formats,
//! completions and the man page.

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use serde_json::{json, Value};

use crate::helpers::*;
use crate::peers::{self, Peer};

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
        let mut c = check_config_command();
        c.arg("--config")
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/config/example.toml"))
            .env_remove("FLOWLEDGER_CALLBACK_KEY")
            .env_remove("DATABASE_URL")
            .env_remove("FLOWLEDGER_CHECKPOINT_SIGNING_KEY");
        output_with(c, envs)
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

/// `flowledger <args>` against the API at `api` with `token` in
/// `FLOWLEDGER_TOKEN`, run without blocking the test's runtime (the API
/// serves on it): exit code, stdout, stderr.
async fn api_cli(api: &str, token: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_flowledger"));
    c.args(args)
        .env("FLOWLEDGER_API_URL", api)
        .env("FLOWLEDGER_TOKEN", token)
        .env_remove("FLOWLEDGER_TOKEN_FILE")
        .env_remove("FLOWLEDGER_OUTPUT");
    let out = c.output().await.expect("flowledger runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// Each line of `stdout` as JSON.
fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect()
}

#[tokio::test]
async fn jobs_and_approvals_from_the_command_line_over_the_http_api() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    let ok = peer.script("/s", vec![peers::ok(5, json!("done"))]);
    let registry = parse_registry(json!({"version": 1, "workflows": {
        "w": {"steps": [solver("s", &ok, 5000, 1)]},
        "gate": {"steps": [solver("s", &ok, 5000, 1)], "requires_approval": true},
    }}));
    let api = spawn_api(&app, true, registry.clone()).await;
    let h = start_handler(&app, registry, test_handler_config()).await;
    let url = api.http.as_str();

    let submitted = api
        .post(
            "/v1/jobs",
            BILLING_TOKEN,
            json!({"job_id": "cli-1", "workflow_key": "w"}),
        )
        .await;
    assert_eq!(submitted.status, 202, "{}", submitted.body);
    // watch: each change once, the last `completed`, exit 0
    let (code, stdout, stderr) = api_cli(
        url,
        BILLING_TOKEN,
        &["jobs", "watch", "cli-1", "--output", "jsonl"],
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let changes = json_lines(&stdout);
    let statuses: Vec<&str> = changes
        .iter()
        .filter_map(|c| c["status"].as_str())
        .collect();
    assert_eq!(statuses.last(), Some(&"completed"), "{stdout}");
    assert!(
        statuses.windows(2).all(|w| w[0] != w[1]),
        "a status printed twice in a row: {stdout}"
    );
    assert!(changes.iter().all(|c| c["job_id"] == "cli-1"), "{stdout}");

    let (code, stdout, stderr) = api_cli(
        url,
        BILLING_TOKEN,
        &["jobs", "show", "cli-1", "--output", "json"],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let job: Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(job["execution_id"], "cli-1", "{job}");
    assert_eq!(job["status"], "completed", "{job}");
    assert_eq!(job["client_id"], "billing", "{job}");

    // the approval: pending in the list, approved from the command line,
    // then its job completes
    let submitted = api
        .post(
            "/v1/jobs",
            BILLING_TOKEN,
            json!({"job_id": "cli-ap", "workflow_key": "gate"}),
        )
        .await;
    assert_eq!(submitted.status, 202, "{}", submitted.body);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let (code, stdout, stderr) = api_cli(
            url,
            OPERATOR_TOKEN,
            &[
                "approvals",
                "list",
                "--status",
                "pending",
                "--output",
                "jsonl",
            ],
        )
        .await;
        assert_eq!(code, Some(0), "{stderr}");
        let items = json_lines(&stdout);
        if items.iter().any(|a| a["approval_id"] == "cli-ap") {
            assert!(items.iter().all(|a| a["status"] == "pending"), "{stdout}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no pending approval cli-ap: {stdout}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (code, stdout, stderr) = api_cli(
        url,
        OPERATOR_TOKEN,
        &[
            "approvals",
            "approve",
            "cli-ap",
            "--reason",
            "checked",
            "--output",
            "json",
        ],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    let decided: Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(decided["status"], "approved", "{decided}");
    assert_eq!(decided["decided_by"], "ops", "{decided}");
    let (code, stdout, stderr) = api_cli(
        url,
        BILLING_TOKEN,
        &["jobs", "watch", "cli-ap", "--output", "table"],
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(
        stdout
            .lines()
            .last()
            .is_some_and(|l| l.starts_with("cli-ap  completed  ")),
        "{stdout}"
    );
    assert_eq!(
        h.settled("cli-ap").await.status,
        flowledger::commands::job::JobStatus::Completed
    );

    // a rejected approval: its job fails, and watch says so with 1
    api.post(
        "/v1/jobs",
        BILLING_TOKEN,
        json!({"job_id": "cli-no", "workflow_key": "gate"}),
    )
    .await;
    let rejected = loop {
        let (code, stdout, stderr) = api_cli(
            url,
            OPERATOR_TOKEN,
            &["approvals", "reject", "cli-no", "--reason", "wrong amount"],
        )
        .await;
        // 404 until the handler has requested the approval
        if code == Some(0) || !stderr.contains("error: not_found: ") {
            break (code, stdout, stderr);
        }
        assert!(std::time::Instant::now() < deadline + std::time::Duration::from_secs(30));
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(rejected.0, Some(0), "{}{}", rejected.1, rejected.2);
    let (code, stdout, stderr) = api_cli(url, BILLING_TOKEN, &["jobs", "watch", "cli-no"]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    let last: Value = serde_json::from_str(&stdout).expect("off a terminal: json");
    assert_eq!(last["status"], "failed", "{last}");
    assert_eq!(last["error_code"], "approval_rejected", "{last}");

    // the list: one object a line, parsed; a table with its header
    api.caught_up(&app.log).await;
    let (code, stdout, stderr) =
        api_cli(url, OPERATOR_TOKEN, &["jobs", "list", "--output", "jsonl"]).await;
    assert_eq!(code, Some(0), "{stderr}");
    let mut ids: Vec<String> = json_lines(&stdout)
        .iter()
        .map(|j| j["execution_id"].as_str().expect("an id").to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["cli-1", "cli-ap", "cli-no"], "{stdout}");
    let (code, stdout, _) = api_cli(
        url,
        OPERATOR_TOKEN,
        &[
            "jobs",
            "list",
            "--status",
            "failed",
            "--workflow",
            "gate",
            "--output",
            "table",
        ],
    )
    .await;
    assert_eq!(code, Some(0));
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0].starts_with("EXECUTION_ID  WORKFLOW_ID  STATUS"),
        "{stdout}"
    );
    assert_eq!(lines.len(), 2, "the header and cli-no: {stdout}");
    assert!(
        lines[1].starts_with("cli-no        gate         failed"),
        "{stdout}"
    );

    // the kill-switch: the operator's; a client is refused (1)
    let (code, _, stderr) = api_cli(
        url,
        BILLING_TOKEN,
        &["workflows", "disable", "w", "--reason", "incident"],
    )
    .await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("error: forbidden: "), "{stderr}");
    for verb in ["disable", "enable"] {
        let (code, stdout, stderr) = api_cli(
            url,
            OPERATOR_TOKEN,
            &[
                "workflows",
                verb,
                "w",
                "--reason",
                "incident",
                "--output",
                "json",
            ],
        )
        .await;
        assert_eq!(code, Some(0), "{verb}: {stderr}");
        let v: Value = serde_json::from_str(&stdout).expect("JSON");
        assert_eq!(v["disabled"], verb == "disable", "{v}");
    }

    // refused by the server: 1 with the envelope once, its param named
    let (code, _, stderr) = api_cli(url, BILLING_TOKEN, &["jobs", "show", "no-such-job"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.matches("error: not_found: ").count(), 1, "{stderr}");
    let (code, _, stderr) = api_cli(url, BILLING_TOKEN, &["jobs", "show", "bad id"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains("error: validation: ") && stderr.contains("(param: id)"),
        "{stderr}"
    );

    // a bad token: 2, the server's message once, the token never shown
    let (code, _, stderr) = api_cli(url, "not-a-known-token", &["jobs", "show", "cli-1"]).await;
    assert_eq!(code, Some(2), "{stderr}");
    assert_eq!(
        stderr.matches("error: unauthenticated: ").count(),
        1,
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(!stderr.contains("not-a-known-token"), "{stderr}");
    // the same token from --token-file
    let dir = tempfile::tempdir().expect("a temp dir");
    let file = dir.path().join("token");
    std::fs::write(&file, format!("{OPERATOR_TOKEN}\n")).unwrap();
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_flowledger"));
    c.args(["jobs", "show", "cli-1", "--output", "json", "--token-file"])
        .arg(&file)
        .env("FLOWLEDGER_API_URL", url)
        .env_remove("FLOWLEDGER_TOKEN")
        .env_remove("FLOWLEDGER_TOKEN_FILE");
    let out = c.output().await.expect("flowledger runs");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // the existing data commands take --output too
    let run = |args: Vec<String>| {
        let mut c = app.nats.cli(Who::Service);
        c.args(args).env_remove("FLOWLEDGER_OUTPUT");
        async move {
            let out = tokio::process::Command::from(c)
                .output()
                .await
                .expect("flowledger runs");
            let stderr = String::from_utf8_lossy(&out.stderr).to_string();
            assert_eq!(out.status.code(), Some(0), "{stderr}");
            String::from_utf8_lossy(&out.stdout).to_string()
        }
    };
    let strings = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let status = run(strings(&[
        "projections",
        "status",
        "--output",
        "jsonl",
        "--database-url",
        &api.url,
    ]))
    .await;
    let rows = json_lines(&status);
    assert!(
        rows.iter()
            .any(|r| r["projection"] == "executions" && r["lag"].is_i64()),
        "{status}"
    );
    let replay = run(strings(&[
        "audit",
        "replay",
        "--aggregate",
        "job",
        "--type",
        "JobSubmitted",
        "--output",
        "json",
    ]))
    .await;
    let events: Value = serde_json::from_str(&replay).expect("one JSON array");
    assert_eq!(events.as_array().map(Vec::len), Some(3), "{replay}");
    let table = run(strings(&[
        "audit",
        "replay",
        "--type",
        "JobSubmitted",
        "--output",
        "table",
    ]))
    .await;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("STREAM_SEQ  STREAM_TIME"), "{table}");
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[1..].iter().all(|l| l.ends_with("JobSubmitted")),
        "{table}"
    );
    h.stop().await;
}

#[tokio::test]
async fn an_unreachable_api_has_its_own_exit_code_and_a_missing_token_is_usage() {
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let (code, stdout, stderr) = api_cli(&nowhere, "some-token", &["jobs", "list"]).await;
    assert_eq!(code, Some(6), "{stdout}{stderr}");
    assert!(
        stderr.contains("cannot reach the flowledger API at"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("API unreachable"),
        "the marker is not printed: {stderr}"
    );
    assert!(!stderr.contains("some-token"), "{stderr}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_flowledger"))
        .args(["approvals", "list", "--api-url", &nowhere])
        .env_remove("FLOWLEDGER_TOKEN")
        .env_remove("FLOWLEDGER_TOKEN_FILE")
        .output()
        .await
        .expect("flowledger runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--token-file"), "{stderr}");
}

#[test]
fn completions_and_the_man_page_are_printed() {
    for (args, expect) in [
        (&["completions", "bash"][..], "jobs"),
        (&["completions", "zsh"][..], "approvals"),
        (&["completions", "fish"][..], "workflows"),
        (&["man"][..], ".TH"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_flowledger"))
            .args(args)
            .output()
            .expect("flowledger runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{args:?}");
        assert!(stdout.contains(expect), "{args:?}: {stdout}");
    }
}

#[tokio::test]
async fn jobs_retry_from_the_command_line_prints_the_new_job() {
    let app = spawn_app().await;
    let peer = Peer::start().await;
    // the first job's one attempt fails; the retry's succeeds
    let flaky = peer.script(
        "/s",
        vec![peers::status(5, 500), peers::ok(5, json!("done"))],
    );
    let registry = parse_registry(json!({"version": 1, "workflows": {
        "w": {"steps": [solver("s", &flaky, 5000, 1)]},
    }}));
    let api = spawn_api(&app, true, registry.clone()).await;
    let h = start_handler(&app, registry, test_handler_config()).await;
    let url = api.http.as_str();
    let submitted = api
        .post(
            "/v1/jobs",
            BILLING_TOKEN,
            json!({"job_id": "cli-rt", "workflow_key": "w"}),
        )
        .await;
    assert_eq!(submitted.status, 202, "{}", submitted.body);
    assert_eq!(
        h.settled("cli-rt").await.status,
        flowledger::commands::job::JobStatus::Failed
    );

    let (code, stdout, stderr) = api_cli(
        url,
        BILLING_TOKEN,
        &["jobs", "retry", "cli-rt", "--output", "json"],
    )
    .await;
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    let answer: Value = serde_json::from_str(&stdout).expect("one JSON document");
    assert_eq!(answer["retry_of"], "cli-rt", "{answer}");
    let new_id = answer["job_id"].as_str().expect("the new job").to_string();
    assert_ne!(new_id, "cli-rt");
    assert_eq!(
        h.settled(&new_id).await.status,
        flowledger::commands::job::JobStatus::Completed
    );
    // a repeat prints the same new job
    let (code, again, stderr) = api_cli(
        url,
        BILLING_TOKEN,
        &["jobs", "retry", "cli-rt", "--output", "json"],
    )
    .await;
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&again).expect("JSON"), answer);
    // the completed retry is refused: exit 1, the server's error printed once
    let (code, stdout, stderr) = api_cli(url, BILLING_TOKEN, &["jobs", "retry", &new_id]).await;
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(stdout.is_empty(), "{stdout}");
    assert_eq!(stderr.matches("error: rejected:").count(), 1, "{stderr}");
    assert!(stderr.contains("completed"), "{stderr}");
    // another client's job: not found, exit 1
    let (code, _, stderr) = api_cli(url, OTHER_TOKEN, &["jobs", "retry", "cli-rt"]).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("not_found"), "{stderr}");
}
