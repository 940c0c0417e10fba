//! Connecting, migrating, and the versioned read-model schema.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::Row;

use crate::projections::ReadModel;

/// The migrations in `migrations/` (projection bookkeeping, handler
/// positions, n8n nonces, parked jobs), embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What went wrong with the read-model database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// PostgreSQL cannot be reached: start it or fix the URL.
    #[error("cannot connect to PostgreSQL at {url}: {source} (start PostgreSQL, or set --database-url / DATABASE_URL)")]
    Connect {
        /// The URL tried, password hidden.
        url: String,
        /// The driver's error.
        source: sqlx::Error,
    },
    /// A migration failed to apply.
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A query failed.
    #[error("read-model database error: {0}")]
    Sql(#[from] sqlx::Error),
    /// No read model has this name (a usage error).
    #[error("unknown projection {0:?}: known are {known}", known = ReadModel::known_names())]
    UnknownProjection(String),
    /// The read model has no active version: run the migrations first.
    #[error("projection {name} has no active version: run `flowledger init` with --database-url")]
    NotInitialised {
        /// The read model's name.
        name: String,
    },
}

/// A pool of at most `max_connections` to the database at `url` (10 s to
/// acquire a connection).
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        .connect(url)
        .await
        .map_err(|source| DbError::Connect {
            url: crate::commands::redact::display(url),
            source,
        })
}

/// Applies the migrations and makes sure every read model of
/// [`ReadModel::ALL`] has an active version with its tables and views
/// (the memory read model is set up where it runs: [`migrate_model`]).
/// Idempotent.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    MIGRATOR.run(pool).await?;
    for model in ReadModel::ALL {
        migrate_model(pool, model).await?;
    }
    Ok(())
}

/// Makes sure `model` has an active version with its tables and views
/// (version 1 if it has none). Idempotent; needs [`MIGRATOR`]'s tables.
pub async fn migrate_model(pool: &PgPool, model: ReadModel) -> Result<(), DbError> {
    if active_version(pool, model).await?.is_some() {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    // Two processes may initialise at once: serialise on the model.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(format!("flowledger-init-{}", model.name()))
        .execute(&mut *tx)
        .await?;
    let again: Option<i32> =
        sqlx::query_scalar("SELECT version FROM projection_checkpoints WHERE name = $1 AND active")
            .bind(model.name())
            .fetch_optional(&mut *tx)
            .await?;
    if again.is_none() {
        for stmt in ddl(model, 1) {
            sqlx::query(&stmt).execute(&mut *tx).await?;
        }
        sqlx::query(
            "INSERT INTO projection_checkpoints (name, version, active) VALUES ($1, 1, TRUE)",
        )
        .bind(model.name())
        .execute(&mut *tx)
        .await?;
        for stmt in switch_views(model, 1) {
            sqlx::query(&stmt).execute(&mut *tx).await?;
        }
    }
    tx.commit().await?;
    Ok(())
}

/// The version of `model` readers' views point at; none before
/// [`migrate`].
pub async fn active_version(pool: &PgPool, model: ReadModel) -> Result<Option<i32>, DbError> {
    Ok(
        sqlx::query_scalar("SELECT version FROM projection_checkpoints WHERE name = $1 AND active")
            .bind(model.name())
            .fetch_optional(pool)
            .await?,
    )
}

/// `CREATE` statements for version `v` of a read model (idempotent):
/// tables first, then secondary indexes ([`is_index`]); a rebuild creates the
/// indexes after its bulk load.
///
/// To add a column: add it here guarded by `v >= N` for a new version N,
/// make `apply` write it when `v >= N`, deploy, run
/// `flowledger projections rebuild NAME` (docs/PROJECTIONS.md).
pub fn ddl(model: ReadModel, v: i32) -> Vec<String> {
    match model {
        ReadModel::Executions => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS workflows_executions_v{v} (
                    id            BIGINT PRIMARY KEY,      -- stream sequence of the \
                                                              JobSubmitted commit
                    workflow_id   VARCHAR(255) NOT NULL,   -- the workflow_key
                    execution_id  VARCHAR(255) NOT NULL UNIQUE, -- the job id
                    status        VARCHAR(50)  NOT NULL,   -- pending|awaiting_approval|\
                                                              running|completed|failed|cancelled
                    input_data    JSONB,
                    output_data   JSONB,
                    error_code    TEXT,
                    error_message TEXT,
                    client_id     TEXT NOT NULL,
                    priority      SMALLINT NOT NULL,
                    started_at    TIMESTAMPTZ,
                    completed_at  TIMESTAMPTZ,
                    duration_ms   INT,
                    created_at    TIMESTAMPTZ NOT NULL,
                    updated_at    TIMESTAMPTZ NOT NULL,
                    last_seq      BIGINT NOT NULL,          -- stream sequence of the last \
                                                               event applied
                    retry_of      TEXT,                     -- the job this one retries
                    retried_by    TEXT                      -- the job that retries this one
                )"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS workflows_executions_v{v}_workflow \
                 ON workflows_executions_v{v} (workflow_id, created_at DESC, id DESC)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS workflows_executions_v{v}_status \
                 ON workflows_executions_v{v} (status, created_at DESC, id DESC)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS workflows_executions_v{v}_created \
                 ON workflows_executions_v{v} (created_at DESC, id DESC)"
            ),
        ],
        ReadModel::Audit => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS audit_trail_v{v} (
                    stream_seq     BIGINT NOT NULL,
                    event_index    SMALLINT NOT NULL,
                    event_id       UUID NOT NULL,
                    occurred_at    TIMESTAMPTZ NOT NULL,
                    client_id      TEXT NOT NULL,
                    user_id        TEXT,
                    aggregate_type TEXT NOT NULL,
                    aggregate_id   TEXT NOT NULL,
                    job_id         TEXT,
                    workflow_key   TEXT,
                    action         TEXT NOT NULL,           -- the event type
                    step           TEXT,                    -- step / node name
                    status         TEXT,
                    error_code     TEXT,
                    error_message  TEXT,
                    duration_ms    BIGINT,
                    event_hash     CHAR(64) NOT NULL,
                    n8n_execution_id TEXT,                  -- the n8n execution that answered
                    PRIMARY KEY (stream_seq, event_index)
                )"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS audit_trail_v{v}_job \
                 ON audit_trail_v{v} (job_id, stream_seq)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS audit_trail_v{v}_client \
                 ON audit_trail_v{v} (client_id, stream_seq)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS audit_trail_v{v}_action \
                 ON audit_trail_v{v} (action, stream_seq)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS audit_trail_v{v}_time \
                 ON audit_trail_v{v} (occurred_at)"
            ),
        ],
        ReadModel::Approvals => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS approvals_v{v} (
                    approval_id     TEXT PRIMARY KEY,
                    job_id          TEXT NOT NULL,
                    workflow_key    TEXT NOT NULL,
                    status          TEXT NOT NULL,          -- pending|approved|rejected|expired
                    requested_by    TEXT NOT NULL,
                    request_reason  TEXT,
                    expires_at      TIMESTAMPTZ NOT NULL,
                    decided_by      TEXT,
                    decision_reason TEXT,
                    decided_at      TIMESTAMPTZ,
                    created_at      TIMESTAMPTZ NOT NULL,
                    updated_at      TIMESTAMPTZ NOT NULL,
                    last_seq        BIGINT NOT NULL
                )"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS approvals_v{v}_status \
                 ON approvals_v{v} (status, created_at DESC)"
            ),
        ],
        ReadModel::SecretAccesses => vec![
            format!(
                "CREATE TABLE IF NOT EXISTS secret_accesses_v{v} (
                    stream_seq          BIGINT NOT NULL,
                    event_index         SMALLINT NOT NULL,
                    event_id            UUID NOT NULL,
                    occurred_at         TIMESTAMPTZ NOT NULL,
                    request_id          TEXT NOT NULL,       -- the aggregate id
                    client_id           TEXT NOT NULL,       -- who read (the actor)
                    user_id             TEXT,
                    path                TEXT NOT NULL,       -- KV v2 path
                    field               TEXT,
                    requested_version   BIGINT,              -- null: the current one
                    kv_version          BIGINT,              -- served (granted)
                    purpose             TEXT NOT NULL,
                    job_id              TEXT,                -- on behalf of this job
                    step                TEXT,
                    decision            TEXT NOT NULL,       -- granted|denied|failed
                    decided_by          TEXT,                -- policy|vault (denied)
                    rule                TEXT,
                    source              TEXT,                -- vault|cache|\
                                                                last_known_good (granted)
                    code                TEXT,                -- unavailable|not_found (failed)
                    reason              TEXT,                -- why denied
                    vault_error_kind    TEXT,
                    vault_error_status  INT,
                    vault_error_message TEXT,
                    read_from_vault_at  TIMESTAMPTZ,         -- granted
                    event_hash          CHAR(64) NOT NULL,
                    PRIMARY KEY (stream_seq, event_index)
                )"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS secret_accesses_v{v}_path \
                 ON secret_accesses_v{v} (path text_pattern_ops, stream_seq)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS secret_accesses_v{v}_client \
                 ON secret_accesses_v{v} (client_id, stream_seq)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS secret_accesses_v{v}_decision \
                 ON secret_accesses_v{v} (decision, stream_seq)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS secret_accesses_v{v}_job \
                 ON secret_accesses_v{v} (job_id, stream_seq)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS secret_accesses_v{v}_request \
                 ON secret_accesses_v{v} (request_id)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS secret_accesses_v{v}_time \
                 ON secret_accesses_v{v} (occurred_at)"
            ),
        ],
        ReadModel::Memory => vec![
            // each version's vector space (made once, for every version)
            format!(
                "CREATE TABLE IF NOT EXISTS {SPACES_TABLE} (
                    version       INT PRIMARY KEY,           -- the memory version
                    model         TEXT NOT NULL,             -- the embedder's model
                    dimensions    INT NOT NULL               -- its vectors' length
                )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS memory_subjects_v{v} (
                    aggregate_id  TEXT PRIMARY KEY,          -- 32 hex of \
                                                                sha256(owner NUL subject_id)
                    owner         TEXT NOT NULL,             -- the client whose subject it is
                    subject_id    TEXT NOT NULL,             -- the client's pseudonymous id
                    opened_at     TIMESTAMPTZ NOT NULL,
                    erased_at     TIMESTAMPTZ,
                    erase_reason  TEXT,
                    last_seq      BIGINT NOT NULL,
                    UNIQUE (owner, subject_id)
                )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS memory_profiles_v{v} (
                    aggregate_id  TEXT PRIMARY KEY,
                    fields        JSONB NOT NULL,            -- merged ProfileUpdated fields
                    updated_at    TIMESTAMPTZ NOT NULL
                )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS memory_episodes_v{v} (
                    aggregate_id  TEXT NOT NULL,
                    episode_id    TEXT NOT NULL,
                    turn_at       TIMESTAMPTZ NOT NULL,      -- the caller's time of the turn
                    recorded_at   TIMESTAMPTZ NOT NULL,      -- the event's occurred_at
                    turn          JSONB NOT NULL,            -- the opened turn: messages \
                                                                (role, content), response
                    seq           BIGINT NOT NULL,
                    extraction    TEXT,                      -- pending|done|failed; null: \
                                                                not asked (or a version made \
                                                                before the extractor)
                    extraction_reason TEXT,                  -- failed: the reason code
                    PRIMARY KEY (aggregate_id, episode_id)
                )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS memory_chunks_v{v} (
                    aggregate_id  TEXT NOT NULL,
                    episode_id    TEXT NOT NULL,
                    idx           INT NOT NULL,              -- the chunk's place in the episode
                    text          TEXT NOT NULL,
                    turn_at       TIMESTAMPTZ NOT NULL,
                    tsv           TSVECTOR GENERATED ALWAYS AS \
                                  (to_tsvector('english', text)) STORED,
                    PRIMARY KEY (aggregate_id, episode_id, idx)
                )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS memory_facts_v{v} (
                    aggregate_id  TEXT NOT NULL,
                    fact_id       TEXT NOT NULL,
                    version       INT NOT NULL,
                    subject       TEXT NOT NULL,
                    key           TEXT NOT NULL,
                    value         JSONB NOT NULL,
                    confidence    FLOAT8 NOT NULL,
                    source        TEXT NOT NULL,             -- command|extractor
                    episode_id    TEXT,
                    valid_from    TIMESTAMPTZ NOT NULL,
                    invalid_at    TIMESTAMPTZ,               -- superseded or forgotten
                    seq           BIGINT NOT NULL,
                    PRIMARY KEY (aggregate_id, fact_id, version)
                )"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS memory_working_state_v{v} (
                    aggregate_id  TEXT NOT NULL,
                    key           TEXT NOT NULL,
                    value         JSONB NOT NULL,
                    expires_at    TIMESTAMPTZ NOT NULL,
                    updated_at    TIMESTAMPTZ NOT NULL,
                    PRIMARY KEY (aggregate_id, key)
                )"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS memory_episodes_v{v}_recent \
                 ON memory_episodes_v{v} (aggregate_id, turn_at DESC)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS memory_chunks_v{v}_tsv \
                 ON memory_chunks_v{v} USING GIN (tsv)"
            ),
            format!(
                "CREATE INDEX IF NOT EXISTS memory_chunks_v{v}_subject \
                 ON memory_chunks_v{v} (aggregate_id)"
            ),
        ],
    }
}

/// True for a statement that creates a secondary index.
pub fn is_index(stmt: &str) -> bool {
    stmt.trim_start().starts_with("CREATE INDEX")
}

/// `ANALYZE` of version `v`'s tables, so the planner has statistics the
/// moment readers switch to it.
pub fn analyze(model: ReadModel, v: i32) -> Vec<String> {
    model
        .tables()
        .iter()
        .map(|t| format!("ANALYZE {t}_v{v}"))
        .collect()
}

/// Statements that point every view of `model` at version `v`. Run inside
/// one transaction, readers switch atomically. `CREATE OR REPLACE` keeps
/// the view itself, so a query waiting on it proceeds on the new version
/// instead of failing; it requires the new version's columns to start with
/// the old ones (columns are only added at the end: docs/PROJECTIONS.md).
pub fn switch_views(model: ReadModel, v: i32) -> Vec<String> {
    model
        .tables()
        .iter()
        .map(|t| format!("CREATE OR REPLACE VIEW {t} AS SELECT * FROM {t}_v{v}"))
        .collect()
}

/// Statements that drop version `v`'s tables (after a rebuild switched
/// away from it); the memory read model's vectors too, if it has them.
pub fn drop_tables(model: ReadModel, v: i32) -> Vec<String> {
    let mut out: Vec<String> = model
        .tables()
        .iter()
        .map(|t| format!("DROP TABLE IF EXISTS {t}_v{v}"))
        .collect();
    if model == ReadModel::Memory {
        out.push(format!("DROP TABLE IF EXISTS {VECTORS_TABLE}_v{v}"));
    }
    out
}

/// The memory read model's chunk vectors (only with `[memory.embedder]`).
pub const VECTORS_TABLE: &str = "memory_chunk_vectors";

/// The vector space of each memory version's chunk vectors.
pub const SPACES_TABLE: &str = "memory_vector_spaces";

/// The vector space of a version's chunk vectors: the embedder's model and
/// dimensions. Vectors of two spaces are not comparable: a version indexes
/// the `EpisodeEmbedded` of its own space only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VectorSpace {
    /// The embedder's model.
    pub model: String,
    /// The vectors' length.
    pub dimensions: u32,
}

impl std::fmt::Display for VectorSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "model {:?} in {} dimensions",
            self.model, self.dimensions
        )
    }
}

/// What version `v`'s vectors table holds: its dimensions, and the model
/// recorded for it (`None`: a table made before spaces were recorded,
/// adopted by the next [`setup_vectors`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSpace {
    /// The `embedding` column's dimensions.
    pub dimensions: i32,
    /// The recorded model.
    pub model: Option<String>,
}

impl TableSpace {
    /// Whether embeddings by `model` in `dimensions` are indexed here.
    pub fn holds(&self, model: &str, dimensions: u32) -> bool {
        i64::from(self.dimensions) == i64::from(dimensions)
            && self.model.as_deref().is_none_or(|m| m == model)
    }

    /// The space as recorded, when its model is.
    pub fn space(&self) -> Option<VectorSpace> {
        Some(VectorSpace {
            model: self.model.clone()?,
            dimensions: u32::try_from(self.dimensions).ok()?,
        })
    }
}

impl std::fmt::Display for TableSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.model {
            Some(m) => write!(f, "model {m:?} in {} dimensions", self.dimensions),
            None => write!(f, "{} dimensions (model not recorded)", self.dimensions),
        }
    }
}

/// Whether `table` has the column `column`: a read-model version made by
/// an older build may lack a column added later (docs/PROJECTIONS.md).
pub async fn has_column<'e, E>(db: E, table: &str, column: &str) -> Result<bool, sqlx::Error>
where
    E: sqlx::PgExecutor<'e>,
{
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($1) \
         AND attname = $2 AND NOT attisdropped)",
    )
    .bind(table)
    .bind(column)
    .fetch_one(db)
    .await
}

/// Version `v`'s [`TableSpace`]; `None`: it has no vectors table.
pub async fn table_space<'e, E>(db: E, v: i32) -> Result<Option<TableSpace>, sqlx::Error>
where
    E: sqlx::PgExecutor<'e>,
{
    let row: Option<(i32, Option<String>)> = sqlx::query_as(&format!(
        "SELECT a.atttypmod, s.model FROM pg_attribute a \
         LEFT JOIN {SPACES_TABLE} s ON s.version = $2 \
         WHERE a.attrelid = to_regclass($1) AND a.attname = 'embedding'"
    ))
    .bind(format!("{VECTORS_TABLE}_v{v}"))
    .bind(v)
    .fetch_optional(db)
    .await?;
    Ok(row.map(|(dimensions, model)| TableSpace { dimensions, model }))
}

/// The chunk vectors of memory version `v`, `dimensions` long, with their
/// HNSW index (cosine distance); needs the `vector` extension.
pub fn vector_ddl(v: i32, dimensions: u32) -> Vec<String> {
    vec![
        format!(
            "CREATE TABLE IF NOT EXISTS {VECTORS_TABLE}_v{v} (
                aggregate_id  TEXT NOT NULL,
                episode_id    TEXT NOT NULL,
                idx           INT NOT NULL,              -- the chunk's idx in memory_chunks
                model         TEXT NOT NULL,
                embedding     vector({dimensions}) NOT NULL,
                PRIMARY KEY (aggregate_id, episode_id, idx)
            )"
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS {VECTORS_TABLE}_v{v}_hnsw              ON {VECTORS_TABLE}_v{v} USING hnsw (embedding vector_cosine_ops)"
        ),
        format!(
            "CREATE INDEX IF NOT EXISTS {VECTORS_TABLE}_v{v}_subject              ON {VECTORS_TABLE}_v{v} (aggregate_id)"
        ),
    ]
}

/// Why the chunk vectors cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum VectorSetupError {
    /// `CREATE EXTENSION vector` failed: pgvector is not installed, or the
    /// role may not create it.
    #[error(
        "[memory.embedder] needs the pgvector extension: CREATE EXTENSION IF NOT EXISTS vector failed: {0} (install pgvector, or have a superuser create the extension in this database)"
    )]
    Extension(sqlx::Error),
    /// The memory read model's vectors are of another model or other
    /// dimensions than configured.
    #[error(
        "{VECTORS_TABLE}_v{version} holds vectors of {found}, [memory.embedder] says {configured}: vectors of two models or dimensions are not comparable. To change to the configured ones, rebuild the memory read model with this configuration (`flowledger projections rebuild memory --config <file>`): its new version indexes the configured space, and serve's embedding handler then embeds every episode of the log again with the configured embedder (each episode's text is sent to it; until it is done, vector search finds only the episodes embedded so far). To keep the recorded vectors, set [memory.embedder] model and dimensions back"
    )]
    Space {
        /// The version.
        version: i32,
        /// The table's.
        found: TableSpace,
        /// The configuration's.
        configured: VectorSpace,
    },
    /// Another database error.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for VectorSetupError {
    fn from(e: sqlx::Error) -> Self {
        VectorSetupError::Db(DbError::from(e))
    }
}

/// Sets up the chunk vectors of memory version `v` (the extension, the
/// table and its index); with `view`, points `memory_chunk_vectors` at it.
pub async fn setup_vectors(
    pool: &PgPool,
    v: i32,
    space: &VectorSpace,
    view: bool,
) -> Result<(), VectorSetupError> {
    sqlx::query("CREATE EXTENSION IF NOT EXISTS vector")
        .execute(pool)
        .await
        .map_err(VectorSetupError::Extension)?;
    if let Some(found) = table_space(pool, v).await? {
        if !found.holds(&space.model, space.dimensions) {
            return Err(VectorSetupError::Space {
                version: v,
                found,
                configured: space.clone(),
            });
        }
    }
    for stmt in vector_ddl(v, space.dimensions) {
        sqlx::query(&stmt).execute(pool).await?;
    }
    // a table made before spaces were recorded is adopted by the
    // configured model (its dimensions agree)
    sqlx::query(&format!(
        "INSERT INTO {SPACES_TABLE} (version, model, dimensions) VALUES ($1, $2, $3) \
         ON CONFLICT (version) DO NOTHING"
    ))
    .bind(v)
    .bind(&space.model)
    .bind(space.dimensions as i32)
    .execute(pool)
    .await?;
    if view {
        let mut tx = pool.begin().await?;
        for stmt in vectors_view(v) {
            sqlx::query(&stmt).execute(&mut *tx).await?;
        }
        tx.commit().await?;
    }
    Ok(())
}

/// Statements (for one transaction) that point the `memory_chunk_vectors`
/// view at version `v`'s table: dropped and made again, as its vectors
/// may have other dimensions than the version it pointed at.
pub fn vectors_view(v: i32) -> [String; 2] {
    [
        format!("DROP VIEW IF EXISTS {VECTORS_TABLE}"),
        format!("CREATE VIEW {VECTORS_TABLE} AS SELECT * FROM {VECTORS_TABLE}_v{v}"),
    ]
}

/// Sets up the chunk vectors of the active memory version
/// ([`setup_vectors`]); after [`migrate_model`].
pub async fn setup_active_vectors(
    pool: &PgPool,
    space: &VectorSpace,
) -> Result<(), VectorSetupError> {
    let v = active_version(pool, ReadModel::Memory)
        .await?
        .ok_or_else(|| DbError::from(sqlx::Error::RowNotFound))?;
    setup_vectors(pool, v, space, true).await
}

/// One projection's row in `projection_checkpoints`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CheckpointRow {
    /// The read model's name (`executions`, `audit`, `approvals`,
    /// `secret_accesses`, `memory`).
    pub name: String,
    /// The schema version (its tables are `<table>_v<version>`).
    pub version: i32,
    /// The last stream sequence applied (0: none).
    pub last_seq: i64,
    /// `running`, `stopped` (at `error_seq`) or `building` (a rebuild).
    pub state: String,
    /// Whether readers' views point at this version.
    pub active: bool,
    /// The stream sequence a stopped projection could not apply.
    pub error_seq: Option<i64>,
    /// The database's reason it could not.
    pub error: Option<String>,
}

/// Every projection version's checkpoint row, by name then version.
pub async fn checkpoints(pool: &PgPool) -> Result<Vec<CheckpointRow>, DbError> {
    let rows = sqlx::query(
        "SELECT name, version, last_seq, state, active, error_seq, error \
         FROM projection_checkpoints ORDER BY name, version",
    )
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|r| {
            Ok(CheckpointRow {
                name: r.try_get("name")?,
                version: r.try_get("version")?,
                last_seq: r.try_get("last_seq")?,
                state: r.try_get("state")?,
                active: r.try_get("active")?,
                error_seq: r.try_get("error_seq")?,
                error: r.try_get("error")?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_switch_every_table() {
        let s = switch_views(ReadModel::Audit, 2).join(";");
        assert!(s.contains("CREATE OR REPLACE VIEW audit_trail AS SELECT * FROM audit_trail_v2"));
    }
}
