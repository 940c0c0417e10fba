//! A 3-node JetStream cluster on loopback for the tests: every node runs
//! nats/production.conf (TLS with a test CA, the accounts, passwords from
//! the environment) plus a `cluster {}` block, on free ports, in a
//! temporary directory removed on drop. Works with nats-server 2.9.10 and
//! 2.15 (binary from [`nats_binary`], as every other test).
//!
//! Routes between the nodes are plain TCP on 127.0.0.1: route TLS is
//! optional in nats-server and adds nothing on loopback; clients still
//! need TLS and a password, as in a deployment.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tempfile::TempDir;

use crate::helpers::{make_certificates, password, Broker, ServerConf, Who};

/// The number of nodes of a test cluster.
pub(crate) const NODES: usize = 3;

/// The cluster's name in every node's `cluster {}` block.
const CLUSTER_NAME: &str = "flowledger-test";

struct Node {
    /// `server_name`, what stream info names a leader by: `n1`, `n2`, `n3`.
    name: String,
    client_port: u16,
    cluster_port: u16,
    child: Option<Child>,
}

/// Three nats-servers with JetStream clustered on loopback; every node
/// killed and the directory deleted on drop.
pub(crate) struct NatsCluster {
    bin: String,
    nodes: Vec<Node>,
    /// The nodes [`NatsCluster::connect`] gives the client (all by default).
    client_nodes: Vec<usize>,
    /// The CA every node's certificate chains to.
    pub(crate) ca: PathBuf,
    dir: TempDir,
}

/// A port nothing listens on now (the kernel's pick for port 0). Another
/// process could take it before the node binds it; on loopback in a test
/// run that does not happen in practice, and a node that cannot bind
/// fails its start loudly.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl NatsCluster {
    /// Starts all three nodes with `bin` and waits until JetStream has a
    /// meta leader that knows every node (see [`NatsCluster::ready`]).
    pub(crate) async fn start(bin: &str) -> Self {
        let mut cluster = Self::prepare(bin);
        for i in 0..NODES {
            cluster.start_again(i);
        }
        cluster.ready().await;
        cluster
    }

    /// The cluster's directories, certificates and configurations, with no
    /// node running yet: start them with [`NatsCluster::start_again`].
    pub(crate) fn prepare(bin: &str) -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        make_certificates(dir.path());
        // the production configuration, verbatim, beside each node's file
        // that includes it (nats-server resolves `include` relative to the
        // including file)
        std::fs::copy(
            concat!(env!("CARGO_MANIFEST_DIR"), "/nats/production.conf"),
            dir.path().join("production.conf"),
        )
        .expect("copy nats/production.conf");
        let nodes: Vec<Node> = (1..=NODES)
            .map(|n| Node {
                name: format!("n{n}"),
                client_port: free_port(),
                cluster_port: free_port(),
                child: None,
            })
            .collect();
        for node in &nodes {
            let routes: Vec<String> = nodes
                .iter()
                .filter(|o| o.name != node.name)
                .map(|o| format!("\"nats-route://127.0.0.1:{}\"", o.cluster_port))
                .collect();
            let conf = format!(
                "# node {name} of a test cluster: nats/production.conf plus clustering\n\
                 include \"production.conf\"\n\
                 server_name: \"{name}\"\n\
                 # plain routes: loopback only (route TLS is optional)\n\
                 cluster {{\n  name: \"{CLUSTER_NAME}\"\n  listen: \"127.0.0.1:{port}\"\n  \
                 routes: [{routes}]\n}}\n",
                name = node.name,
                port = node.cluster_port,
                routes = routes.join(", "),
            );
            std::fs::create_dir_all(dir.path().join(&node.name)).expect("a node directory");
            std::fs::write(dir.path().join(format!("{}.conf", node.name)), conf)
                .expect("write a node configuration");
        }
        NatsCluster {
            bin: bin.to_string(),
            nodes,
            client_nodes: (0..NODES).collect(),
            ca: dir.path().join("ca.pem"),
            dir,
        }
    }

    fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(&self.nodes[i].name)
    }

    /// The `server_name` of node `i` (`n1`, ...).
    pub(crate) fn name(&self, i: usize) -> &str {
        &self.nodes[i].name
    }

    /// The client URL of node `i`.
    pub(crate) fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.nodes[i].client_port)
    }

    /// The client URLs of all nodes, separated by commas (as `--nats-url`
    /// and the `nats` CLI take them).
    pub(crate) fn urls(&self) -> String {
        (0..NODES)
            .map(|i| self.url(i))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Whether node `i` runs.
    pub(crate) fn running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Kills node `i` (SIGKILL), as a crash would.
    pub(crate) fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts node `i` (again) on its ports with its store; returns once it
    /// listens for clients (not once it has rejoined: see
    /// [`NatsCluster::ready`]).
    pub(crate) fn start_again(&mut self, i: usize) {
        assert!(!self.running(i), "node {i} already runs");
        let dir = self.node_dir(i);
        let node = &self.nodes[i];
        let mut cmd = Command::new(&self.bin);
        cmd.args(["-a", "127.0.0.1", "-p", &node.client_port.to_string()])
            .arg("--ports_file_dir")
            .arg(&dir)
            .arg("-c")
            .arg(self.dir.path().join(format!("{}.conf", node.name)))
            .env("FLOWLEDGER_NATS_STORE_DIR", dir.join("store"))
            .env(
                "FLOWLEDGER_NATS_TLS_CERT",
                self.dir.path().join("server.pem"),
            )
            .env(
                "FLOWLEDGER_NATS_TLS_KEY",
                self.dir.path().join("server.key"),
            )
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("server.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        for who in Who::ALL {
            cmd.env(who.password_env(), password(ServerConf::Production, who));
        }
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot run {}: {e} (run scripts/install-deps.sh, or set FLOWLEDGER_NATS_SERVER)",
                self.bin
            )
        });
        let ports_file = dir.join(format!("nats-server_{}.ports", child.id()));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if ports_file.exists() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} (node {}) exited at start: {status}; its log: {}",
                    self.bin,
                    node.name,
                    std::fs::read_to_string(dir.join("server.log")).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} (node {}) did not start within 10 s",
                    self.bin, node.name
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&ports_file);
        self.nodes[i].child = Some(child);
    }

    /// Connection options of `who` (its user, password, inbox prefix, the
    /// test CA), as [`crate::helpers::NatsServer::options`], reconnecting
    /// without limit, and waiting for a reply as long as `flowledger send`
    /// does: the service's append wait (10 s) and 5 s more, since a command
    /// can wait that long through a leader election.
    pub(crate) fn options(&self, who: Who) -> async_nats::ConnectOptions {
        async_nats::ConnectOptions::new()
            .request_timeout(Some(Duration::from_secs(15)))
            .user_and_password(who.user().into(), password(ServerConf::Production, who))
            .custom_inbox_prefix(format!("_INBOX_{}", who.user()))
            .add_root_certificates(self.ca.clone())
            .require_tls(true)
            .max_reconnects(None)
    }

    fn addrs(urls: &[String]) -> Vec<async_nats::ServerAddr> {
        urls.iter()
            .map(|u| u.parse().expect("a test node URL"))
            .collect()
    }

    /// A connection as `who` given every node's URL (the client picks one
    /// and fails over to the others), or those of [`NatsCluster::clients_on`].
    pub(crate) async fn connect(&self, who: Who) -> async_nats::Client {
        let urls: Vec<String> = self.client_nodes.iter().map(|&i| self.url(i)).collect();
        self.connect_to(who, &urls).await
    }

    /// Gives later connections of [`NatsCluster::connect`] (those of a
    /// [`crate::helpers::TestApp`] built on this cluster) only these nodes'
    /// URLs: a test that kills a node keeps them off it.
    pub(crate) fn clients_on(&mut self, nodes: &[usize]) {
        assert!(!nodes.is_empty(), "connections need a node");
        self.client_nodes = nodes.to_vec();
    }

    /// A connection as `who` given only these URLs.
    pub(crate) async fn connect_to(&self, who: Who, urls: &[String]) -> async_nats::Client {
        self.options(who)
            .connect(Self::addrs(urls))
            .await
            .unwrap_or_else(|e| panic!("connect to the test cluster {urls:?} as {who:?}: {e}"))
    }

    /// A `flowledger` command line that connects to every node as `who`
    /// (through the environment, as [`crate::helpers::NatsServer::cli`]).
    pub(crate) fn cli(&self, who: Who) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowledger"));
        cmd.env("FLOWLEDGER_NATS_URL", self.urls())
            .env("FLOWLEDGER_NATS_USER", who.user())
            .env(
                "FLOWLEDGER_NATS_PASSWORD",
                password(ServerConf::Production, who),
            )
            .env("FLOWLEDGER_NATS_CA", &self.ca);
        for other in [
            "FLOWLEDGER_NATS_CREDS",
            "FLOWLEDGER_NATS_NKEY",
            "FLOWLEDGER_NATS_INBOX_PREFIX",
        ] {
            cmd.env_remove(other);
        }
        cmd
    }

    /// Waits until JetStream answers `$JS.API.INFO` as the service on
    /// every running node: the cluster has a meta leader and each running
    /// node knows it. Panics after 60 s naming the last error.
    pub(crate) async fn ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for i in (0..NODES).filter(|&i| self.running(i)) {
            let url = self.url(i);
            let mut last = String::new();
            loop {
                if let Ok(Ok(c)) = tokio::time::timeout(
                    Duration::from_secs(2),
                    self.options(Who::Service)
                        .connect(Self::addrs(std::slice::from_ref(&url))),
                )
                .await
                {
                    // raw: async-nats's account info type does not parse
                    // 2.9.10's answer
                    let asked = c.request("$JS.API.INFO", "".into());
                    match tokio::time::timeout(Duration::from_secs(2), asked).await {
                        Ok(Ok(m)) => {
                            let v: serde_json::Value =
                                serde_json::from_slice(&m.payload).unwrap_or_default();
                            if v.get("error").is_none() && v.get("type").is_some() {
                                break;
                            }
                            last = v.to_string();
                        }
                        Ok(Err(e)) => last = e.to_string(),
                        Err(_) => last = "no answer within 2 s".into(),
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "JetStream on {} not ready within 60 s: {last}",
                    self.name(i)
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// A connection as the service to the nodes that run now, whatever
    /// [`NatsCluster::clients_on`] says: the harness's own questions.
    async fn inspector(&self) -> async_nats::Client {
        let urls: Vec<String> = (0..NODES)
            .filter(|&i| self.running(i))
            .map(|i| self.url(i))
            .collect();
        self.connect_to(Who::Service, &urls).await
    }

    /// The stream's info as the service sees it (any node answers).
    pub(crate) async fn stream_info(&self, stream: &str) -> jetstream::stream::Info {
        let js = jetstream::new(self.inspector().await);
        let mut s = js
            .get_stream(stream)
            .await
            .unwrap_or_else(|e| panic!("stream {stream}: {e}"));
        s.info()
            .await
            .unwrap_or_else(|e| panic!("info of {stream}: {e}"))
            .clone()
    }

    /// The index of the node that leads `stream`, waiting up to 30 s for
    /// the stream to have a leader (asked every 100 ms, each question given
    /// 1 s: a stream without a leader does not answer).
    pub(crate) async fn stream_leader(&self, stream: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(1))
            .build(self.inspector().await);
        loop {
            let leader = match js.get_stream(stream).await {
                Ok(mut s) => s
                    .info()
                    .await
                    .ok()
                    .and_then(|i| i.cluster.as_ref().and_then(|c| c.leader.clone())),
                Err(_) => None,
            };
            if let Some(i) = leader
                .as_deref()
                .and_then(|l| self.nodes.iter().position(|n| n.name == l))
            {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "stream {stream} has no leader after 30 s (last: {leader:?})"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Node `i`'s log (stderr), to show when a test fails.
    pub(crate) fn log_of(&self, i: usize) -> String {
        std::fs::read_to_string(self.node_dir(i).join("server.log")).unwrap_or_default()
    }
}

impl Broker for NatsCluster {
    async fn connect(&self, who: Who) -> async_nats::Client {
        NatsCluster::connect(self, who).await
    }

    fn cli(&self, who: Who) -> Command {
        NatsCluster::cli(self, who)
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..NODES {
            self.kill(i);
        }
    }
}

/// Which node a connection is on, by its server name.
pub(crate) fn node_of(cluster: &NatsCluster, client: &async_nats::Client) -> Option<usize> {
    let name = client.server_info().server_name;
    (0..NODES).find(|&i| cluster.name(i) == name)
}
