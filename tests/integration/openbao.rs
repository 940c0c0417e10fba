//! An OpenBao server for the secrets tests: `bao server -dev` (binary from
//! FLOWLEDGER_BAO, else `bao` on PATH; scripts/install-deps.sh installs
//! OpenBao 2.7.2 and prints its path as BAO_BIN) on a free loopback port,
//! in a temporary directory, with a file audit device writing there.
//!
//! Dev mode keeps everything in memory: after [`OpenBao::stop`] and
//! [`OpenBao::start_again`] the server is empty again (KV v2 at `secret/`,
//! the same root token, nothing else): policies, tokens, AppRole and
//! secrets are gone, and callers write again what they need. The audit file
//! is kept and appended to.
//!
//! OpenBao 2.x enables audit devices only from its configuration (the API
//! answers 400), so the device is declared in a config file given with
//! `-config=`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

/// The root token of every test server.
pub(crate) const ROOT_TOKEN: &str = "flowledger-test-root";

pub(crate) fn bao_binary() -> String {
    std::env::var("FLOWLEDGER_BAO").unwrap_or_else(|_| "bao".into())
}

/// An OpenBao dev server; killed on drop, its directory deleted.
pub(crate) struct OpenBao {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    http: reqwest::Client,
}

impl OpenBao {
    /// Starts a server and waits until `/v1/sys/health` answers 200.
    pub(crate) async fn start() -> OpenBao {
        let dir = tempfile::tempdir().expect("a temporary directory");
        std::fs::create_dir(dir.path().join("audit")).expect("the audit directory");
        std::fs::write(
            dir.path().join("bao.hcl"),
            format!(
                "audit \"file\" \"file\" {{\n  options {{\n    file_path = \"{}\"\n  }}\n}}\n",
                dir.path().join("audit").join("audit.log").display()
            ),
        )
        .expect("write the OpenBao configuration");
        let http = flowledger::handlers::http_client_builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("an HTTP client");
        let mut bao = OpenBao {
            child: None,
            port: 0,
            dir,
            http,
        };
        // a port free now may be taken before bao binds it: try others
        for _ in 0..5 {
            bao.port = crate::helpers::free_port();
            if bao.spawn().await {
                return bao;
            }
        }
        panic!(
            "{} did not start on any of 5 ports: {}",
            bao_binary(),
            bao.log_tail()
        );
    }

    /// Starts bao on `self.port`; false if it exited at start (port taken).
    async fn spawn(&mut self) -> bool {
        let bin = bao_binary();
        let log = std::fs::File::create(self.dir.path().join("bao.log")).expect("the bao log");
        let mut cmd = Command::new(&bin);
        cmd.arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={ROOT_TOKEN}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{}", self.port))
            .arg(format!(
                "-config={}",
                self.dir.path().join("bao.hcl").display()
            ))
            // dev mode stores the root token in ~/.vault-token: not ours
            .env("HOME", self.dir.path())
            .env_remove("VAULT_ADDR")
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_TOKEN")
            .env_remove("BAO_TOKEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the bao log"))
            .stderr(log);
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot run {bin}: {e} (run scripts/install-deps.sh and set FLOWLEDGER_BAO to the BAO_BIN it prints)")
        });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(r) = self
                .http
                .get(format!("{}/v1/sys/health", self.addr()))
                .send()
                .await
            {
                if r.status().as_u16() == 200 {
                    return true;
                }
            }
            if let Some(Ok(Some(_))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.stop();
        panic!(
            "{bin} did not answer /v1/sys/health within 20 s: {}",
            self.log_tail()
        );
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// `http://127.0.0.1:PORT`.
    pub(crate) fn addr(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub(crate) fn root_token(&self) -> &'static str {
        ROOT_TOKEN
    }

    /// The file the audit device writes.
    pub(crate) fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit").join("audit.log")
    }

    /// The audit file's records (one JSON object a line).
    pub(crate) fn audit_lines(&self) -> Vec<Value> {
        std::fs::read_to_string(self.audit_path())
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("an audit line is JSON"))
            .collect()
    }

    /// The request paths of the audit file's `request` records.
    pub(crate) fn audited_requests(&self) -> Vec<String> {
        self.audit_lines()
            .iter()
            .filter(|l| l["type"] == "request")
            .filter_map(|l| l["request"]["path"].as_str().map(str::to_string))
            .collect()
    }

    /// One API call as root: status and body (JSON, or null when empty).
    pub(crate) async fn api(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut req = self
            .http
            .request(method, format!("{}/v1/{path}", self.addr()))
            .header("X-Vault-Token", ROOT_TOKEN);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("OpenBao request {path}: {e}"));
        let status = r.status().as_u16();
        let text = r.text().await.expect("OpenBao's answer");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// An API call that must succeed (2xx); its body.
    async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let (status, answer) = self.api(method, path, body).await;
        assert!(
            (200..300).contains(&status),
            "OpenBao {method} {path}: {status} {answer}"
        );
        answer
    }

    /// Writes `data` as a new version of `secret/data/<path>` (KV v2 in
    /// the `secret/` mount); the version written.
    /// Right after a start the dev server upgrades `secret/` to KV v2 in
    /// the background and answers 400 "Upgrading from non-versioned to
    /// versioned data" meanwhile: that is waited out (up to 20 s).
    pub(crate) async fn put_secret(&self, path: &str, data: Value) -> u64 {
        let at = format!("secret/data/{path}");
        let body = json!({ "data": data });
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (status, answer) = self.api("POST", &at, Some(body.clone())).await;
            if (200..300).contains(&status) {
                return answer["data"]["version"]
                    .as_u64()
                    .expect("the version written");
            }
            let upgrading = status == 400 && answer.to_string().contains("Upgrading");
            assert!(
                upgrading && Instant::now() < deadline,
                "OpenBao POST {at}: {status} {answer}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Writes the ACL policy `name`.
    pub(crate) async fn write_policy(&self, name: &str, hcl: &str) {
        self.ok(
            "PUT",
            &format!("sys/policies/acl/{name}"),
            Some(json!({ "policy": hcl })),
        )
        .await;
    }

    /// A new child token of root with these policies (and `default`).
    pub(crate) async fn token_with_policies(&self, policies: &[&str]) -> String {
        let answer = self
            .ok(
                "POST",
                "auth/token/create",
                Some(json!({ "policies": policies })),
            )
            .await;
        answer["auth"]["client_token"]
            .as_str()
            .expect("a client token")
            .to_string()
    }

    /// Enables the AppRole auth method at `approle/`.
    pub(crate) async fn enable_approle(&self) {
        self.ok(
            "POST",
            "sys/auth/approle",
            Some(json!({ "type": "approle" })),
        )
        .await;
    }

    /// An AppRole role with these policies whose tokens live `token_ttl`
    /// (renewable up to 60 s, or `token_ttl` if longer); its role_id and a
    /// new secret_id.
    pub(crate) async fn approle(
        &self,
        role: &str,
        policies: &[&str],
        token_ttl: Duration,
    ) -> (String, String) {
        self.approle_ttls(
            role,
            policies,
            token_ttl,
            token_ttl.max(Duration::from_secs(60)),
        )
        .await
    }

    /// [`approle`](Self::approle) with the tokens' max TTL.
    pub(crate) async fn approle_ttls(
        &self,
        role: &str,
        policies: &[&str],
        token_ttl: Duration,
        token_max_ttl: Duration,
    ) -> (String, String) {
        self.ok(
            "POST",
            &format!("auth/approle/role/{role}"),
            Some(json!({
                "token_policies": policies,
                "token_ttl": format!("{}s", token_ttl.as_secs()),
                "token_max_ttl": format!("{}s", token_max_ttl.as_secs()),
            })),
        )
        .await;
        let id = self
            .ok("GET", &format!("auth/approle/role/{role}/role-id"), None)
            .await;
        let secret = self
            .ok("POST", &format!("auth/approle/role/{role}/secret-id"), None)
            .await;
        (
            id["data"]["role_id"]
                .as_str()
                .expect("a role_id")
                .to_string(),
            secret["data"]["secret_id"]
                .as_str()
                .expect("a secret_id")
                .to_string(),
        )
    }

    /// Kills the server (SIGKILL); its port stops answering.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on its port after [`stop`](Self::stop):
    /// an empty dev server (see the module's note); nothing is seeded.
    pub(crate) async fn start_again(&mut self) {
        assert!(self.child.is_none(), "start_again without stop");
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.spawn().await {
            assert!(
                Instant::now() < deadline,
                "{} did not start again on port {}: {}",
                bao_binary(),
                self.port,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Makes the audit device unable to write: a directory takes the audit
    /// file's place and a SIGHUP makes OpenBao reopen it. (A read-only file
    /// would not do: the tests may run as root, who writes anyway.) Every
    /// audited request then answers 500; `/v1/sys/health` still 200.
    pub(crate) async fn break_audit(&self) {
        let path = self.audit_path();
        let _ = std::fs::remove_file(&path);
        std::fs::create_dir(&path).expect("a directory in the audit file's place");
        self.hangup().await;
    }

    /// Undoes [`break_audit`](Self::break_audit) (the earlier records are
    /// gone).
    pub(crate) async fn repair_audit(&self) {
        std::fs::remove_dir(self.audit_path()).expect("remove the audit directory");
        self.hangup().await;
    }

    async fn hangup(&self) {
        let pid = self.child.as_ref().expect("the server runs").id();
        // SAFETY: kill has no memory preconditions.
        let rc = unsafe { libc::kill(pid as i32, libc::SIGHUP) };
        assert_eq!(rc, 0, "SIGHUP to bao");
        // it reopens its audit file asynchronously
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl Drop for OpenBao {
    fn drop(&mut self) {
        self.stop();
    }
}
