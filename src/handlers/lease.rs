//! Partition leases: how several `serve` instances share the job handler.
//!
//! Jobs fall into [`PARTITIONS`] partitions by a hash of their id. An
//! instance drives the jobs of the partitions it holds a lease on; the
//! leases are keys of a JetStream KV bucket whose entries expire
//! ([`LEASE_BUCKET`], `max_age` = the lease's time to live), taken with
//! `create` and renewed with revision-checked `update`s, so at most one
//! instance holds a partition at a time and a dead instance's leases lapse
//! on the server's clock. Each instance announces itself (`m.<id>`), counts
//! the live instances and holds its fair share: it takes free partitions up
//! to that share and gives the extra ones away after draining them (the
//! jobs running steps there end or the drain deadline passes), so a new
//! instance gets work and a leaving one hands it over.
//!
//! A lease the holder cannot renew in time is treated as lost locally
//! (before the server lets it lapse), and every command a driver issues is
//! fenced with its lease: each lease taken gets the next value of one
//! counter ([`STATE_BUCKET`], key `fence`), the job records the newest fence
//! it was driven under (`JobHandlerChanged`), and a command under an older
//! one is refused by the aggregate. A paused process that wakes up with a
//! lapsed lease cannot write to a job once its new holder has written to
//! it (a repeated command id still answers its first receipt; approval
//! commands are not fenced, each has one id).
//! docs/adr/0010-handler-leases.md has the reasoning.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::{mpsc, watch, OwnedRwLockReadGuard, OwnedRwLockWriteGuard, RwLock};

use crate::commands::job::Lease;
use crate::events::chain;

/// Partitions the jobs fall into: at most this many instances share the
/// handler. Fixed: a job's partition must not change while it runs.
pub const PARTITIONS: usize = 32;
/// The KV bucket of the leases and the instances' announcements.
pub const LEASE_BUCKET: &str = "flow_handler_leases";
/// The KV bucket of the handler's durable state: the fence counter and the
/// low-water mark.
pub const STATE_BUCKET: &str = "flow_handler_state";
/// A lease's time to live when `flowledger init` (or the first `serve`)
/// creates the bucket; instances read it from the bucket.
pub const LEASE_TTL: Duration = Duration::from_secs(6);
/// How long a partition given away waits for its running jobs' effects
/// (step calls, callbacks) to end before their drivers are stopped anyway.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(30);
const FENCE_KEY: &str = "fence";
/// The longest a lease operation may take before it counts as failed.
const KV_CALL: Duration = Duration::from_secs(2);
/// The longest a round spends taking partitions: renewals wait for it.
const ACQUIRE_BUDGET: Duration = Duration::from_secs(1);
const POSITION_KEY: &str = "position";
/// How long the job handler's loop may go without saying it runs (it says
/// so every second) before its instance gives up its leases.
pub const HANDLER_STALL: Duration = Duration::from_secs(3);

/// The partition of a job: the first 8 bytes of the SHA-256 of its id,
/// modulo [`PARTITIONS`] (stable across versions and machines).
pub fn partition(job_id: &str) -> usize {
    let h = chain::sha256(job_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&h[..8]);
    (u64::from_be_bytes(first) % PARTITIONS as u64) as usize
}

fn lease_key(p: usize) -> String {
    format!("p.{p:02}")
}

/// Why the lease buckets could not be opened or created.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// JetStream refused or did not answer; check NATS and the service
    /// user's JetStream permissions.
    #[error("cannot open or create the KV bucket {bucket}: {reason}")]
    Bucket {
        /// The bucket's name.
        bucket: &'static str,
        /// What JetStream said.
        reason: String,
    },
}

/// The KV bucket's stream configuration, written out: async-nats 0.51's
/// `create_key_value` cannot read nats-server 2.9.10's answer, so the
/// stream is created through the JetStream API directly, with only the
/// fields 2.9 knows (the KV conventions: one message per key, rollups,
/// direct gets).
fn bucket_stream(bucket: &'static str, replicas: usize) -> serde_json::Value {
    let max_age = if bucket == LEASE_BUCKET {
        LEASE_TTL
    } else {
        Duration::ZERO
    };
    let duplicates = if max_age.is_zero() {
        Duration::from_secs(120)
    } else {
        max_age.min(Duration::from_secs(120))
    };
    let description = if bucket == LEASE_BUCKET {
        "flowledger job handler: partition leases and live instances"
    } else {
        "flowledger job handler: fence counter and low-water mark"
    };
    json!({
        "name": format!("KV_{bucket}"),
        "description": description,
        "subjects": [format!("$KV.{bucket}.>")],
        "retention": "limits",
        "max_consumers": -1,
        "max_msgs_per_subject": 1,
        "max_msgs": -1,
        "max_bytes": -1,
        "max_age": max_age.as_nanos() as u64,
        "max_msg_size": -1,
        "storage": "file",
        "discard": "new",
        "num_replicas": replicas.max(1),
        "duplicate_window": duplicates.as_nanos() as u64,
        "allow_rollup_hdrs": true,
        "deny_delete": true,
        "deny_purge": false,
        "allow_direct": true,
    })
}

/// JetStream's error code for "stream name already in use".
const STREAM_NAME_IN_USE: u64 = 10058;

/// Creates the bucket's stream; `update`: change an existing one to this
/// configuration (its replicas). Ok when it exists already and `update`
/// is false.
async fn create_bucket(
    js: &jetstream::Context,
    bucket: &'static str,
    replicas: usize,
    update: bool,
) -> Result<(), LeaseError> {
    let failed = |reason: String| LeaseError::Bucket { bucket, reason };
    let config = bucket_stream(bucket, replicas);
    let answer: serde_json::Value = js
        .request(format!("STREAM.CREATE.KV_{bucket}"), &config)
        .await
        .map_err(|e| failed(e.to_string()))?;
    let Some(error) = answer.get("error") else {
        return Ok(());
    };
    if error["err_code"].as_u64() != Some(STREAM_NAME_IN_USE) {
        return Err(failed(error.to_string()));
    }
    if !update {
        return Ok(());
    }
    let answer: serde_json::Value = js
        .request(format!("STREAM.UPDATE.KV_{bucket}"), &config)
        .await
        .map_err(|e| failed(e.to_string()))?;
    match answer.get("error") {
        None => Ok(()),
        Some(error) => Err(failed(error.to_string())),
    }
}

/// Creates the handler's buckets with `replicas` copies, or updates them
/// (idempotent; `flowledger init`).
pub async fn init(js: &jetstream::Context, replicas: usize) -> Result<(), LeaseError> {
    for bucket in [LEASE_BUCKET, STATE_BUCKET] {
        create_bucket(js, bucket, replicas, true).await?;
    }
    Ok(())
}

/// Opens a bucket, creating it (one replica) when it does not exist yet.
async fn open(js: &jetstream::Context, bucket: &'static str) -> Result<kv::Store, LeaseError> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    tracing::info!(
        bucket,
        "creating the KV bucket with one replica (`flowledger init --replicas N` sets more)"
    );
    create_bucket(js, bucket, 1, false).await?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| LeaseError::Bucket {
            bucket,
            reason: e.to_string(),
        })
}

#[derive(Debug, Clone, Copy)]
enum Hold {
    Free,
    Held {
        fence: u64,
        /// Past this instant the lease may have lapsed on the server.
        until: Instant,
        /// Being given away: no driver starts here, no new effect begins.
        draining: bool,
    },
}

struct Part {
    hold: Mutex<Hold>,
    /// Readers: drivers in the middle of effects; the writer: a drain.
    work: Arc<RwLock<()>>,
}

/// Whether the job handler's loop makes progress (it reads the log), as
/// the keeper sees it: leases are held only for a loop that does.
struct Health {
    /// When the loop last said it runs; `None`: not yet, or it failed.
    beat: Mutex<Option<Instant>>,
    /// Flips when the loop starts running or fails, so the keeper acts at
    /// once.
    up: watch::Sender<bool>,
}

/// The drain of the whole instance (`serve` told to stop): no partition
/// is taken, every held one is given away once its effects end.
struct Drain {
    /// The grace period once the drain started; none: not draining.
    grace: watch::Sender<Option<Duration>>,
    /// True once the drain began and no partition is held any more.
    done: watch::Sender<bool>,
    /// Effects (a job's run of its steps, a callback) in flight, by job.
    effects: Mutex<BTreeMap<String, usize>>,
    /// Step calls in flight, by job.
    calls: Mutex<BTreeMap<String, usize>>,
    /// Jobs whose effects ended while draining.
    finished: Mutex<BTreeSet<String>>,
    /// Jobs whose effects were still running when their partition's
    /// drain deadline passed.
    abandoned: Mutex<BTreeSet<String>>,
}

/// How a drain of the instance ended ([`Leases::drained`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Jobs whose step calls (or callback) ended and were recorded.
    pub finished: Vec<String>,
    /// Jobs still calling a peer when the grace period ended: stopped, the
    /// next holder of their partition sends the call again (same
    /// `Idempotency-Key`).
    pub abandoned: Vec<String>,
}

/// The partitions this instance holds, as the drivers see them.
pub struct Leases {
    holder: String,
    parts: Vec<Part>,
    health: Health,
    drain: Drain,
}

/// An effect on a job admitted by [`Leases::effect`]: its partition is not
/// given away while this lives.
pub struct Effect {
    leases: Arc<Leases>,
    job_id: String,
    _work: OwnedRwLockReadGuard<()>,
}

impl Drop for Effect {
    fn drop(&mut self) {
        let d = &self.leases.drain;
        let left = {
            let mut effects = d.effects.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = effects.get_mut(&self.job_id) {
                *n -= 1;
                if *n == 0 {
                    effects.remove(&self.job_id);
                }
            }
            effects.len()
        };
        let abandoned = d
            .abandoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&self.job_id);
        // an abandoned job's effect ends when its driver is stopped
        if self.leases.draining() && !abandoned {
            d.finished
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(self.job_id.clone());
            tracing::info!(
                job_id = %self.job_id,
                jobs_left = left,
                "draining: a job's step calls ended"
            );
        }
    }
}

/// A step call in flight ([`Leases::calling`]), counted for the drain's
/// log lines.
pub struct Calling {
    leases: Arc<Leases>,
    job_id: String,
}

impl Drop for Calling {
    fn drop(&mut self) {
        let mut calls = self
            .leases
            .drain
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = calls.get_mut(&self.job_id) {
            *n -= 1;
            if *n == 0 {
                calls.remove(&self.job_id);
            }
        }
    }
}

impl Leases {
    /// No partition held yet; `holder` names this instance in leases and
    /// events.
    pub fn new(holder: String) -> Self {
        Leases {
            holder,
            parts: (0..PARTITIONS)
                .map(|_| Part {
                    hold: Mutex::new(Hold::Free),
                    work: Arc::new(RwLock::new(())),
                })
                .collect(),
            health: Health {
                beat: Mutex::new(None),
                up: watch::Sender::new(false),
            },
            drain: Drain {
                grace: watch::Sender::new(None),
                done: watch::Sender::new(false),
                effects: Mutex::default(),
                calls: Mutex::default(),
                finished: Mutex::default(),
                abandoned: Mutex::default(),
            },
        }
    }

    /// The instance is draining (`serve` told to stop): no driver, no
    /// attempt, no retry wait and no effect starts; held partitions are
    /// given away as their effects end.
    pub fn draining(&self) -> bool {
        self.drain.grace.borrow().is_some()
    }

    /// Starts draining the instance: the keeper takes no partition, stops
    /// announcing this instance and gives every held partition away once
    /// its effects end, at the latest after `grace`. Returns the step calls
    /// and the jobs in flight now. A second call changes nothing.
    pub fn begin_drain(&self, grace: Duration) -> (usize, usize) {
        self.drain.grace.send_if_modified(|g| {
            let first = g.is_none();
            if first {
                *g = Some(grace);
            }
            first
        });
        let steps = self
            .drain
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .sum();
        let jobs = self
            .drain
            .effects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len();
        (steps, jobs)
    }

    /// Waits until the drain begun by [`Leases::begin_drain`] ended: no
    /// partition is held any more. Returns the jobs whose effects ended
    /// meanwhile and those given up at the deadline.
    pub async fn drained(&self) -> DrainReport {
        let mut done = self.drain.done.subscribe();
        let _ = done.wait_for(|d| *d).await;
        self.drain_report()
    }

    /// The drain's outcome so far (an abandoned job is not also counted
    /// as finished).
    pub fn drain_report(&self) -> DrainReport {
        let abandoned: Vec<String> = self
            .drain
            .abandoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        let finished = self
            .drain
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|j| !abandoned.contains(j))
            .cloned()
            .collect();
        DrainReport {
            finished,
            abandoned,
        }
    }

    /// Ends a drain the keeper did not finish in time: every effect still
    /// in flight is abandoned.
    pub fn give_up_drain(&self) -> DrainReport {
        let late: Vec<String> = self
            .drain
            .effects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect();
        self.drain
            .abandoned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(late);
        self.drain_report()
    }

    /// The jobs of partition `p` with effects in flight.
    fn effects_in(&self, p: usize) -> Vec<String> {
        self.drain
            .effects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .filter(|j| partition(j) == p)
            .cloned()
            .collect()
    }

    /// Says the drain ended when it runs and no partition is held.
    fn check_drained(&self) {
        let free = (0..PARTITIONS).all(|p| matches!(self.hold(p), Hold::Free));
        if self.draining() && free {
            self.drain
                .done
                .send_if_modified(|d| !std::mem::replace(d, true));
        }
    }

    /// Counts a step call of `job_id` in flight while the guard lives.
    pub fn calling(self: &Arc<Self>, job_id: &str) -> Calling {
        *self
            .drain
            .calls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(job_id.to_string())
            .or_default() += 1;
        Calling {
            leases: self.clone(),
            job_id: job_id.to_string(),
        }
    }

    /// The job handler's loop runs (it reads the log): said when it starts
    /// reading and at every turn of its loop (each second). Until it is
    /// first said, and from [`HANDLER_STALL`] after it was last said, the
    /// keeper holds no lease.
    pub fn handler_running(&self) {
        *self.health.beat.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        self.health
            .up
            .send_if_modified(|up| !std::mem::replace(up, true));
    }

    /// The job handler's loop failed (its drivers stopped with it): the
    /// keeper lets go of every lease at once, so another instance takes the
    /// partitions over, and takes them again once the loop runs.
    pub fn handler_failed(&self) {
        *self.health.beat.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.health
            .up
            .send_if_modified(|up| std::mem::replace(up, false));
    }

    /// The loop said it runs within `stall`.
    fn handler_up(&self, stall: Duration) -> bool {
        self.health
            .beat
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|b| b.elapsed() < stall)
    }

    /// A new instance name: `<host>/<pid>/<random>`.
    pub fn instance_name() -> String {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        let id = uuid::Uuid::new_v4().simple().to_string();
        format!("{host}/{}/{}", std::process::id(), &id[..12])
    }

    /// This instance's name.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    fn hold(&self, p: usize) -> Hold {
        match self.parts.get(p) {
            Some(part) => *part.hold.lock().unwrap_or_else(|e| e.into_inner()),
            None => Hold::Free,
        }
    }

    fn set(&self, p: usize, h: Hold) {
        if let Some(part) = self.parts.get(p) {
            *part.hold.lock().unwrap_or_else(|e| e.into_inner()) = h;
        }
    }

    /// The lease to fence a command on `job_id` with: none when this
    /// instance does not hold the job's partition (or may have lost it).
    pub fn lease(&self, job_id: &str) -> Option<Lease> {
        match self.hold(partition(job_id)) {
            Hold::Held { fence, until, .. } if Instant::now() < until => Some(Lease {
                fence,
                holder: self.holder.clone(),
            }),
            _ => None,
        }
    }

    /// Drivers may start in partition `p`: it is held, not being given
    /// away, and the instance is not draining.
    pub fn may_start(&self, p: usize) -> bool {
        !self.draining()
            && matches!(self.hold(p), Hold::Held { until, draining: false, .. } if Instant::now() < until)
    }

    /// Admits an effect on `job_id` (a run of its steps, a callback); the
    /// partition is not given away while the guard lives. None: the
    /// partition is not held (any more), or it or the instance drains.
    pub async fn effect(self: &Arc<Self>, job_id: &str) -> Option<Effect> {
        let p = partition(job_id);
        let part = self.parts.get(p)?;
        if !self.may_start(p) {
            return None;
        }
        let guard = part.work.clone().read_owned().await;
        // a drain may have run while this waited
        if !self.may_start(p) {
            return None;
        }
        *self
            .drain
            .effects
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(job_id.to_string())
            .or_default() += 1;
        Some(Effect {
            leases: self.clone(),
            job_id: job_id.to_string(),
            _work: guard,
        })
    }

    /// Partitions held now (draining ones included).
    pub fn held(&self) -> usize {
        (0..PARTITIONS)
            .filter(|&p| matches!(self.hold(p), Hold::Held { until, .. } if Instant::now() < until))
            .count()
    }
}

/// What the keeper's round changed, for the manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The partition is held: start the drivers of its jobs.
    Acquired(usize),
    /// The partition is lost (or given away): stop its drivers now.
    Lost(usize),
}

/// A drained partition, with the drain's guard when every effect ended in
/// time.
type Drained = (usize, u64, Option<OwnedRwLockWriteGuard<()>>);

/// Takes, renews and gives away this instance's leases ([`Keeper::run`],
/// a task of its own: a busy manager never delays a renewal).
pub struct Keeper {
    leases: Arc<Leases>,
    kv: kv::Store,
    state: kv::Store,
    ttl: Duration,
    member_key: String,
    revisions: Vec<Option<u64>>,
    /// This instance's announcement is (or may be) in the bucket.
    announced: bool,
    drained_tx: mpsc::UnboundedSender<Drained>,
    drained_rx: mpsc::UnboundedReceiver<Drained>,
}

impl Keeper {
    /// Opens the buckets (creating them when missing).
    pub async fn open(js: &jetstream::Context, leases: Arc<Leases>) -> Result<Self, LeaseError> {
        let kv = open(js, LEASE_BUCKET).await?;
        let state = open(js, STATE_BUCKET).await?;
        let ttl = match kv.status().await {
            Ok(s) if s.max_age() >= Duration::from_secs(1) => s.max_age(),
            Ok(s) => {
                tracing::warn!(
                    max_age_ms = s.max_age().as_millis() as u64,
                    "the lease bucket's entries do not expire after a second or more; \
                     leases renew as if they lived {} s: recreate it with `flowledger init`",
                    LEASE_TTL.as_secs()
                );
                LEASE_TTL
            }
            Err(e) => {
                return Err(LeaseError::Bucket {
                    bucket: LEASE_BUCKET,
                    reason: e.to_string(),
                })
            }
        };
        let member_key = format!(
            "m.{}",
            chain::to_hex(&chain::sha256(leases.holder.as_bytes()))
        );
        let (drained_tx, drained_rx) = mpsc::unbounded_channel();
        Ok(Keeper {
            leases,
            kv,
            state,
            ttl,
            member_key,
            revisions: vec![None; PARTITIONS],
            announced: false,
            drained_tx,
            drained_rx,
        })
    }

    /// The time between rounds: a third of the lease's life.
    pub fn period(&self) -> Duration {
        self.ttl / 3
    }

    /// How long after a renewal was sent the lease is still surely held:
    /// the server stamps it later than it was sent, and a sixth of its life
    /// is kept as margin.
    fn valid_for(&self) -> Duration {
        self.ttl - self.ttl / 6
    }

    fn value(&self, fence: Option<u64>) -> bytes::Bytes {
        json!({"holder": self.leases.holder, "fence": fence})
            .to_string()
            .into()
    }

    /// Where the handler's low-water mark is kept.
    pub fn positions(&self) -> Positions {
        Positions {
            state: self.state.clone(),
        }
    }
}

/// The handler's low-water mark in [`STATE_BUCKET`].
#[derive(Clone)]
pub struct Positions {
    state: kv::Store,
}

impl Positions {
    /// The low-water mark saved last, if any.
    pub async fn position(&self) -> Result<Option<u64>, String> {
        let got = self
            .state
            .get(POSITION_KEY)
            .await
            .map_err(|e| e.to_string())?;
        Ok(got.and_then(|v| std::str::from_utf8(&v).ok()?.trim().parse().ok()))
    }

    /// Saves the low-water mark.
    pub async fn save_position(&self, next_seq: u64) -> Result<(), String> {
        self.state
            .put(POSITION_KEY, next_seq.to_string().into())
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

impl Keeper {
    /// One round: renews the leases held, announces this instance, takes
    /// free partitions up to the fair share and starts giving away the
    /// ones above it. Returns the partitions gained and lost.
    async fn tick(&mut self, out: &mpsc::UnboundedSender<Change>) {
        // a handler whose loop does not run keeps no lease: its jobs would
        // wait for it while another instance could drive them
        if !self.leases.handler_up(HANDLER_STALL) {
            self.stand_down(out).await;
            return;
        }
        // losses first, at once: the drivers stop before anything else waits
        let mut changes = Vec::new();
        self.renew(&mut changes).await;
        for c in changes.drain(..) {
            let _ = out.send(c);
        }
        let grace = *self.leases.drain.grace.borrow();
        if let Some(grace) = grace {
            // a draining instance takes nothing and is not counted in the
            // others' fair share; its leases are renewed until given away
            for p in 0..PARTITIONS {
                self.drain(p, grace);
            }
        }
        if self.leases.draining() {
            self.withdraw().await;
            self.leases.check_drained();
            return;
        }
        // bounded, so the next renewal comes in time whatever the broker's
        // load (a key taken but not recorded when this is cut short lapses)
        let budget = self.period() / 2;
        let _ = tokio::time::timeout(budget, self.rebalance(&mut changes)).await;
        for c in changes {
            let _ = out.send(c);
        }
    }

    /// Lets go of every lease and withdraws this instance's announcement
    /// (so the others' fair share counts it out): the handler's loop is
    /// failing or stalled.
    async fn stand_down(&mut self, out: &mpsc::UnboundedSender<Change>) {
        let held: Vec<usize> = (0..PARTITIONS)
            .filter(|&p| {
                self.revisions[p].is_some() || matches!(self.leases.hold(p), Hold::Held { .. })
            })
            .collect();
        if !held.is_empty() || self.announced {
            tracing::warn!(
                partitions = held.len(),
                "the job handler's loop is not running; giving up its partition leases \
                 so another instance drives their jobs"
            );
        }
        for p in held {
            // no command goes out under this lease from here on
            self.leases.set(p, Hold::Free);
            let _ = out.send(Change::Lost(p));
            let _ = tokio::time::timeout(KV_CALL, self.let_go(p)).await;
        }
        self.withdraw().await;
        self.leases.check_drained();
    }

    /// Withdraws this instance's announcement, if it is (or may be) in the
    /// bucket.
    async fn withdraw(&mut self) {
        if self.announced {
            match tokio::time::timeout(KV_CALL, self.kv.delete(&self.member_key)).await {
                Ok(Ok(_)) => self.announced = false,
                // tried again next round; it lapses meanwhile
                _ => tracing::debug!("cannot withdraw this handler instance's announcement"),
            }
        }
    }

    /// The instance drains: every held partition is given away once its
    /// effects end, at the latest after `grace`.
    async fn drain_all(&mut self, grace: Duration) {
        for p in 0..PARTITIONS {
            self.drain(p, grace);
        }
        self.withdraw().await;
        self.leases.check_drained();
    }

    /// Announces this instance, takes free partitions up to the fair
    /// share (for at most a second, so renewals are never held up long) and
    /// starts giving away the ones above it.
    async fn rebalance(&mut self, changes: &mut Vec<Change>) {
        self.announced = true;
        if let Err(e) = self
            .kv
            .put(&self.member_key, self.value(None))
            .await
            .map_err(|e| e.to_string())
        {
            tracing::warn!(error = %e, "cannot announce this handler instance; retrying");
            return;
        }
        let keys = match tokio::time::timeout(KV_CALL, self.keys()).await {
            Ok(Ok(k)) => k,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot list the handler leases; retrying");
                return;
            }
            Err(_) => {
                tracing::warn!("listing the handler leases took over 2 s; retrying");
                return;
            }
        };
        let members = keys.iter().filter(|k| k.starts_with("m.")).count().max(1);
        let taken: BTreeSet<String> = keys.into_iter().filter(|k| k.starts_with("p.")).collect();
        let fair = PARTITIONS.div_ceil(members);
        let active: Vec<usize> = (0..PARTITIONS)
            .filter(|&p| {
                matches!(
                    self.leases.hold(p),
                    Hold::Held {
                        draining: false,
                        ..
                    }
                )
            })
            .collect();
        if active.len() < fair {
            let mut free: Vec<usize> = (0..PARTITIONS)
                .filter(|&p| self.revisions[p].is_none() && !taken.contains(&lease_key(p)))
                .collect();
            fastrand::shuffle(&mut free);
            let mut held = active.len();
            let started = Instant::now();
            for p in free {
                if held >= fair || started.elapsed() > ACQUIRE_BUDGET {
                    break;
                }
                if self.acquire(p).await {
                    changes.push(Change::Acquired(p));
                    held += 1;
                }
            }
        } else if active.len() > fair {
            for &p in active.iter().rev().take(active.len() - fair) {
                self.drain(p, DRAIN_DEADLINE);
            }
        }
    }

    /// Renews every lease held, all at once. A lease whose validity passed
    /// before it was renewed is lost (drivers saw it lapse and stopped):
    /// it is let go, and taken again later under a new fence.
    async fn renew(&mut self, changes: &mut Vec<Change>) {
        let mut renewals = Vec::new();
        for p in 0..PARTITIONS {
            let Some(revision) = self.revisions[p] else {
                continue;
            };
            match self.leases.hold(p) {
                Hold::Held {
                    fence,
                    until,
                    draining,
                } if Instant::now() < until => {
                    let (kv, value) = (self.kv.clone(), self.value(Some(fence)));
                    renewals.push(async move {
                        let sent = Instant::now();
                        let r =
                            tokio::time::timeout(KV_CALL, kv.update(lease_key(p), value, revision))
                                .await;
                        (p, fence, draining, sent, until, r)
                    });
                }
                _ => {
                    tracing::warn!(
                        partition = p,
                        "a job partition's lease was not renewed in time; its drivers \
                         stop and it is taken again under a new fence"
                    );
                    self.forget_now(p);
                    changes.push(Change::Lost(p));
                }
            }
        }
        for (p, fence, draining, sent, until, r) in futures::future::join_all(renewals).await {
            match r {
                // answered after the lease's validity: drivers may have seen
                // it lapse and stopped, so it is not picked up again as is
                Ok(Ok(_)) if Instant::now() >= until => {
                    tracing::warn!(partition = p, "a lease renewal came back too late");
                    self.forget_now(p);
                    changes.push(Change::Lost(p));
                }
                Ok(Ok(revision)) => {
                    self.revisions[p] = Some(revision);
                    self.leases.set(
                        p,
                        Hold::Held {
                            fence,
                            until: sent + self.valid_for(),
                            draining,
                        },
                    );
                }
                Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(
                        partition = p,
                        error = %e,
                        "lost the lease on a job partition; its drivers stop \
                         (another instance takes it over)"
                    );
                    self.revisions[p] = None;
                    self.leases.set(p, Hold::Free);
                    changes.push(Change::Lost(p));
                }
                // tried again next round, while the lease is still valid
                Ok(Err(e)) => tracing::debug!(partition = p, error = %e, "lease renewal failed"),
                Err(_) => tracing::debug!(partition = p, "lease renewal not answered in 2 s"),
            }
        }
    }

    async fn keys(&self) -> Result<Vec<String>, String> {
        let mut keys = self.kv.keys().await.map_err(|e| e.to_string())?;
        let mut all = Vec::new();
        while let Some(k) = keys.next().await {
            all.push(k.map_err(|e| e.to_string())?);
        }
        Ok(all)
    }

    /// Takes partition `p`: creates its key, draws a fence, then confirms
    /// the key is still this instance's (so any later holder draws a larger
    /// fence).
    async fn acquire(&mut self, p: usize) -> bool {
        let key = lease_key(p);
        let revision = match self.kv.create(&key, self.value(None)).await {
            Ok(r) => r,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => return false,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cannot take a partition lease");
                return false;
            }
        };
        let fence = match self.next_fence().await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cannot draw a lease fence");
                let _ = self.kv.delete_expect_revision(&key, Some(revision)).await;
                return false;
            }
        };
        let sent = Instant::now();
        match self
            .kv
            .update(&key, self.value(Some(fence)), revision)
            .await
        {
            Ok(r) => {
                self.revisions[p] = Some(r);
                self.leases.set(
                    p,
                    Hold::Held {
                        fence,
                        until: sent + self.valid_for(),
                        draining: false,
                    },
                );
                tracing::info!(partition = p, fence, "took the lease on a job partition");
                true
            }
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "lost a lease while taking it");
                let _ = self.kv.delete_expect_revision(&key, Some(revision)).await;
                false
            }
        }
    }

    /// The next value of the fence counter (compare-and-set).
    async fn next_fence(&self) -> Result<u64, String> {
        for _ in 0..50 {
            let entry = self
                .state
                .entry(FENCE_KEY)
                .await
                .map_err(|e| e.to_string())?;
            match entry {
                Some(e) if e.operation == kv::Operation::Put => {
                    let n: u64 = std::str::from_utf8(&e.value)
                        .ok()
                        .and_then(|s| s.trim().parse().ok())
                        .ok_or_else(|| {
                            format!(
                                "the fence counter in {STATE_BUCKET} is not a number; \
                                 an operator changed it"
                            )
                        })?;
                    let next = n.checked_add(1).ok_or("the fence counter is exhausted")?;
                    match self
                        .state
                        .update(FENCE_KEY, next.to_string().into(), e.revision)
                        .await
                    {
                        Ok(_) => return Ok(next),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                        Err(e) => return Err(e.to_string()),
                    }
                }
                // a new counter starts at the time in milliseconds: above
                // every fence a deleted one gave
                _ => {
                    let first = u64::try_from(chrono::Utc::now().timestamp_millis())
                        .unwrap_or(1)
                        .max(1);
                    match self.state.create(FENCE_KEY, first.to_string().into()).await {
                        Ok(_) => return Ok(first),
                        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                        Err(e) => return Err(e.to_string()),
                    }
                }
            }
        }
        Err("the fence counter kept changing under 50 attempts".into())
    }

    /// Starts giving `p` away: no new driver or effect starts there; once
    /// the running effects end (or `deadline` passes: [`DRAIN_DEADLINE`]
    /// for a rebalance, the grace period for the instance's drain)
    /// [`Keeper::run`] lets it go. A partition draining already keeps its
    /// deadline.
    fn drain(&self, p: usize, deadline: Duration) {
        let Hold::Held {
            fence,
            until,
            draining: false,
        } = self.leases.hold(p)
        else {
            return;
        };
        self.leases.set(
            p,
            Hold::Held {
                fence,
                until,
                draining: true,
            },
        );
        tracing::info!(partition = p, "giving a job partition to another instance");
        let work = self.leases.parts[p].work.clone();
        let (tx, leases) = (self.drained_tx.clone(), self.leases.clone());
        tokio::spawn(async move {
            let guard = tokio::time::timeout(deadline, work.write_owned())
                .await
                .ok();
            if guard.is_none() && leases.draining() {
                // stopped when the partition is let go: the next holder
                // sends their calls again
                let late = leases.effects_in(p);
                leases
                    .drain
                    .abandoned
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(late);
            }
            let _ = tx.send((p, fence, guard));
        });
    }

    /// Forgets partition `p` now and deletes its key in the background (a
    /// NATS outage must not delay the drivers' stop).
    fn forget_now(&mut self, p: usize) {
        self.leases.set(p, Hold::Free);
        if let Some(revision) = self.revisions[p].take() {
            let kv = self.kv.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    KV_CALL,
                    kv.delete_expect_revision(lease_key(p), Some(revision)),
                )
                .await;
            });
        }
    }

    /// Forgets partition `p`, then deletes its key so another instance
    /// takes it at once.
    async fn let_go(&mut self, p: usize) {
        self.leases.set(p, Hold::Free);
        if let Some(revision) = self.revisions[p].take() {
            if let Err(e) = self
                .kv
                .delete_expect_revision(lease_key(p), Some(revision))
                .await
            {
                tracing::debug!(partition = p, error = %e, "lease not deleted; it lapses");
            }
        }
    }

    /// Keeps the leases until `stop` changes: a round every
    /// [`Keeper::period`], drained partitions given away as their drains
    /// end; every partition gained or lost goes to `changes`. On stop every
    /// lease and the announcement are deleted, so the other instances take
    /// over at once.
    pub async fn run(
        mut self,
        changes: mpsc::UnboundedSender<Change>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut round = tokio::time::interval(self.period());
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut health = self.leases.health.up.subscribe();
        let mut drain = self.leases.drain.grace.subscribe();
        loop {
            tokio::select! {
                _ = round.tick() => self.tick(&changes).await,
                // the handler's loop started or failed: act now, not next round
                Ok(()) = health.changed() => self.tick(&changes).await,
                Ok(()) = drain.changed() => {
                    let grace = *drain.borrow_and_update();
                    if let Some(grace) = grace {
                        self.drain_all(grace).await;
                    }
                }
                Some((p, fence, guard)) = self.drained_rx.recv() => {
                    // a drain of a lease lost and taken again meanwhile is stale
                    if matches!(self.leases.hold(p), Hold::Held { fence: f, .. } if f == fence) {
                        // no command goes out under this lease from here on
                        self.leases.set(p, Hold::Free);
                        let _ = changes.send(Change::Lost(p));
                        // bounded: an unreachable NATS must not hold up the
                        // other drains (the key lapses)
                        let _ = tokio::time::timeout(KV_CALL, self.let_go(p)).await;
                    }
                    drop(guard);
                    self.leases.check_drained();
                }
                _ = stop.changed() => break,
            }
        }
        for p in 0..PARTITIONS {
            self.leases.set(p, Hold::Free);
        }
        let release = async {
            for p in 0..PARTITIONS {
                self.let_go(p).await;
            }
            let _ = self.kv.delete(&self.member_key).await;
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), release).await;
    }
}

/// Leadership of a task one instance runs at a time (the checkpoint
/// signer): the key `s.<name>` in [`LEASE_BUCKET`], taken and renewed like a
/// partition's. [`Singleton::is_leader`] is false from the moment the lease
/// may have lapsed, so a leader that lost it stops before anyone else
/// starts.
pub struct Singleton {
    until: Mutex<Option<Instant>>,
}

impl Singleton {
    /// Keeps trying to lead `name` until `stop` changes; the returned handle
    /// says whether this instance leads now.
    pub async fn start(
        js: &jetstream::Context,
        name: &str,
        holder: String,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<Arc<Singleton>, LeaseError> {
        let kv = open(js, LEASE_BUCKET).await?;
        let ttl = kv
            .status()
            .await
            .map(|s| s.max_age())
            .ok()
            .filter(|t| *t >= Duration::from_secs(1))
            .unwrap_or(LEASE_TTL);
        let me = Arc::new(Singleton {
            until: Mutex::new(None),
        });
        let (handle, key) = (me.clone(), format!("s.{name}"));
        let value: bytes::Bytes = json!({ "holder": holder }).to_string().into();
        tokio::spawn(async move {
            let mut revision: Option<u64> = None;
            let mut round = tokio::time::interval(ttl / 3);
            loop {
                tokio::select! {
                    _ = round.tick() => {}
                    _ = stop.changed() => break,
                }
                let sent = Instant::now();
                let held = match revision {
                    Some(r) if handle.is_leader() => {
                        match tokio::time::timeout(KV_CALL, kv.update(&key, value.clone(), r)).await
                        {
                            Ok(Ok(next)) => Some(next),
                            Ok(Err(e)) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                                None
                            }
                            // not answered: still ours while it is valid; tried again next round
                            _ => {
                                if !handle.is_leader() {
                                    revision = None;
                                }
                                continue;
                            }
                        }
                    }
                    _ => tokio::time::timeout(KV_CALL, kv.create(&key, value.clone()))
                        .await
                        .ok()
                        .and_then(Result::ok),
                };
                if held.is_some() != revision.is_some() {
                    tracing::info!(task = %key, leader = held.is_some(), "leadership changed");
                }
                revision = held;
                *handle.until.lock().unwrap_or_else(|e| e.into_inner()) =
                    held.map(|_| sent + ttl - ttl / 6);
            }
            *handle.until.lock().unwrap_or_else(|e| e.into_inner()) = None;
            if let Some(r) = revision {
                let _ = kv.delete_expect_revision(&key, Some(r)).await;
            }
        });
        Ok(me)
    }

    /// This instance leads now.
    pub fn is_leader(&self) -> bool {
        self.until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some_and(|u| Instant::now() < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        // the hash is a contract: a job keeps its partition across versions
        assert_eq!(partition("job-1"), partition("job-1"));
        let mut counts = [0usize; PARTITIONS];
        for i in 0..32_000 {
            counts[partition(&format!("job-{i}"))] += 1;
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
    }

    #[tokio::test]
    async fn a_free_partition_gives_no_lease_and_admits_no_effect() {
        let l = Arc::new(Leases::new("me".into()));
        assert!(l.lease("job-1").is_none());
        assert!(l.effect("job-1").await.is_none());
        let p = partition("job-1");
        l.set(
            p,
            Hold::Held {
                fence: 7,
                until: Instant::now() + Duration::from_secs(60),
                draining: false,
            },
        );
        assert_eq!(l.lease("job-1").map(|x| x.fence), Some(7));
        assert!(l.effect("job-1").await.is_some());
        // a draining partition still fences commands, admits no new effect
        l.set(
            p,
            Hold::Held {
                fence: 7,
                until: Instant::now() + Duration::from_secs(60),
                draining: true,
            },
        );
        assert!(l.lease("job-1").is_some());
        assert!(l.effect("job-1").await.is_none());
        // past its validity the lease is not used, even before the keeper notices
        l.set(
            p,
            Hold::Held {
                fence: 7,
                until: Instant::now(),
                draining: false,
            },
        );
        assert!(l.lease("job-1").is_none());
        assert_eq!(l.held(), 0);
    }

    #[tokio::test]
    async fn a_draining_instance_starts_nothing_and_counts_what_ends() {
        let l = Arc::new(Leases::new("me".into()));
        for job in ["job-1", "job-2"] {
            l.set(
                partition(job),
                Hold::Held {
                    fence: 7,
                    until: Instant::now() + Duration::from_secs(60),
                    draining: false,
                },
            );
        }
        let running = l.effect("job-1").await.expect("held: admitted");
        let call = l.calling("job-1");
        assert_eq!(l.begin_drain(Duration::from_secs(30)), (1, 1));
        // a second signal changes nothing
        assert_eq!(l.begin_drain(Duration::from_secs(1)), (1, 1));
        assert_eq!(*l.drain.grace.borrow(), Some(Duration::from_secs(30)));
        assert!(l.draining());
        assert!(!l.may_start(partition("job-2")), "no new driver or attempt");
        assert!(l.effect("job-2").await.is_none(), "no new effect");
        assert!(l.lease("job-1").is_some(), "the running one still records");
        drop(call);
        drop(running);
        assert_eq!(
            l.drain_report(),
            DrainReport {
                finished: vec!["job-1".into()],
                abandoned: vec![],
            }
        );
        // not done while a partition is held; done once none is
        l.check_drained();
        assert!(!*l.drain.done.borrow());
        for job in ["job-1", "job-2"] {
            l.set(partition(job), Hold::Free);
        }
        l.check_drained();
        assert_eq!(l.drained().await.finished, vec!["job-1".to_string()]);
    }

    #[tokio::test]
    async fn a_drain_that_runs_out_abandons_what_still_runs() {
        let l = Arc::new(Leases::new("me".into()));
        l.set(
            partition("job-9"),
            Hold::Held {
                fence: 1,
                until: Instant::now() + Duration::from_secs(60),
                draining: false,
            },
        );
        let _running = l.effect("job-9").await.expect("held: admitted");
        l.begin_drain(Duration::from_secs(1));
        let r = l.give_up_drain();
        assert_eq!(r.abandoned, vec!["job-9".to_string()]);
        assert!(r.finished.is_empty());
    }
}
