//! PostgreSQL 18 with pgvector and pg_trgm (the groundwork of the
//! conversation memory, issue 14): vectors bound and read through the
//! `pgvector` crate, an HNSW index answering a nearest-neighbour query, a
//! 1536-dimension column (an embedding's size), trigram similarity. The
//! server comes from `FLOWLEDGER_PG18_BIN` (scripts/install-deps.sh).

use ::pgvector::Vector;
use sqlx::{Connection, Row};

use crate::helpers::pgvector_database;

/// A deterministic pseudo-random number in [-1, 1) for (`i`, `j`)
/// (splitmix64 of the pair).
fn noise(i: u64, j: u64) -> f32 {
    let mut z = (i << 32 | j).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

fn embedding(i: u64, dim: u64) -> Vec<f32> {
    (0..dim).map(|j| noise(i, j)).collect()
}

fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x * *y)).sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(x * x)).sum::<f64>().sqrt();
    1.0 - dot / (norm(a) * norm(b))
}

const ROWS: u64 = 300;
const DIM: u64 = 8;
/// The row the query vector is a slightly moved copy of.
const TARGET: u64 = 137;

#[tokio::test]
async fn an_hnsw_index_finds_the_nearest_vector_and_trigrams_match_a_misspelling() {
    let url = pgvector_database().await;
    // one connection: the session setting below applies to every query
    let mut db = sqlx::PgConnection::connect(&url)
        .await
        .expect("connect to the PostgreSQL 18 test database");

    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut db)
        .await
        .expect("server version");
    assert!(version.starts_with("18."), "PostgreSQL {version}, not 18");
    let vector_version: String =
        sqlx::query_scalar("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
            .fetch_one(&mut db)
            .await
            .expect("the vector extension");
    assert!(
        vector_version.starts_with("0.8."),
        "pgvector {vector_version}"
    );

    sqlx::query(&format!(
        "CREATE TABLE memory (id bigint PRIMARY KEY, embedding vector({DIM}) NOT NULL)"
    ))
    .execute(&mut db)
    .await
    .expect("create table memory");
    sqlx::query("CREATE INDEX memory_hnsw ON memory USING hnsw (embedding vector_cosine_ops)")
        .execute(&mut db)
        .await
        .expect("create the HNSW index");
    let mut tx = db.begin().await.expect("begin");
    for i in 0..ROWS {
        sqlx::query("INSERT INTO memory (id, embedding) VALUES ($1, $2)")
            .bind(i as i64)
            .bind(Vector::from(embedding(i, DIM)))
            .execute(&mut *tx)
            .await
            .expect("insert a vector");
    }
    tx.commit().await.expect("commit");
    sqlx::query("ANALYZE memory")
        .execute(&mut db)
        .await
        .expect("analyze");

    // a vector read back is the one written
    let back: Vector = sqlx::query_scalar("SELECT embedding FROM memory WHERE id = $1")
        .bind(TARGET as i64)
        .fetch_one(&mut db)
        .await
        .expect("read a vector");
    assert_eq!(back.to_vec(), embedding(TARGET, DIM));

    // the query: TARGET's vector moved by 1 %; by brute force it is the nearest
    let query: Vec<f32> = embedding(TARGET, DIM)
        .iter()
        .enumerate()
        .map(|(j, x)| x + 0.01 * noise(9_999, j as u64))
        .collect();
    let mut by_distance: Vec<(f64, u64)> = (0..ROWS)
        .map(|i| (cosine_distance(&embedding(i, DIM), &query), i))
        .collect();
    by_distance.sort_by(|a, b| a.0.total_cmp(&b.0));
    assert_eq!(by_distance[0].1, TARGET, "the test data's nearest row");
    assert!(
        by_distance[1].0 > 10.0 * by_distance[0].0,
        "the nearest row stands apart: {:?}",
        &by_distance[..2]
    );

    // the planner would scan 300 rows; make it use the index
    sqlx::query("SET enable_seqscan = off")
        .execute(&mut db)
        .await
        .expect("set enable_seqscan");
    let nearest = "SELECT id, embedding <=> $1 AS distance FROM memory \
                   ORDER BY embedding <=> $1 LIMIT 5";
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {nearest}"))
        .bind(Vector::from(query.clone()))
        .fetch_all(&mut db)
        .await
        .expect("explain the nearest-neighbour query");
    assert!(
        plan.iter()
            .any(|l| l.contains("Index Scan using memory_hnsw")),
        "the query does not use the HNSW index: {plan:#?}"
    );
    let rows = sqlx::query(nearest)
        .bind(Vector::from(query.clone()))
        .fetch_all(&mut db)
        .await
        .expect("nearest-neighbour query");
    assert_eq!(rows.len(), 5);
    let first: i64 = rows[0].get("id");
    assert_eq!(first as u64, TARGET, "nearest row by the HNSW index");
    let distance: f64 = rows[0].get("distance");
    assert!(
        (distance - by_distance[0].0).abs() < 1e-5,
        "cosine distance {distance}, expected {}",
        by_distance[0].0
    );

    // an embedding's size (1536, OpenAI's text-embedding-3-small), indexed too
    sqlx::query(
        "CREATE TABLE memory_1536 (id bigint PRIMARY KEY, embedding vector(1536) NOT NULL)",
    )
    .execute(&mut db)
    .await
    .expect("create table memory_1536");
    sqlx::query(
        "CREATE INDEX memory_1536_hnsw ON memory_1536 USING hnsw (embedding vector_cosine_ops)",
    )
    .execute(&mut db)
    .await
    .expect("create the 1536-dimension HNSW index");
    for i in 0..3u64 {
        sqlx::query("INSERT INTO memory_1536 (id, embedding) VALUES ($1, $2)")
            .bind(i as i64)
            .bind(Vector::from(embedding(1_000 + i, 1536)))
            .execute(&mut db)
            .await
            .expect("insert a 1536-dimension vector");
    }
    let (id, dims): (i64, i32) = sqlx::query_as(
        "SELECT id, vector_dims(embedding) FROM memory_1536 ORDER BY embedding <=> $1 LIMIT 1",
    )
    .bind(Vector::from(embedding(1_001, 1536)))
    .fetch_one(&mut db)
    .await
    .expect("nearest 1536-dimension vector");
    assert_eq!((id, dims), (1, 1536));
    let wrong = sqlx::query("INSERT INTO memory_1536 (id, embedding) VALUES (9, $1)")
        .bind(Vector::from(embedding(9, DIM)))
        .execute(&mut db)
        .await
        .expect_err("an 8-dimension vector in a vector(1536) column");
    assert!(
        wrong.to_string().contains("expected 1536 dimensions"),
        "{wrong}"
    );

    // pg_trgm: a misspelled phrase finds its text, through a trigram index
    // (enable_seqscan is still off)
    sqlx::query("CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL)")
        .execute(&mut db)
        .await
        .expect("create table notes");
    sqlx::query("CREATE INDEX notes_trgm ON notes USING gin (body gin_trgm_ops)")
        .execute(&mut db)
        .await
        .expect("create the trigram index");
    let notes = [
        "the invoice total was confirmed by the customer",
        "conversation memory keeps what the user said earlier",
        "the solver timed out on the second attempt",
        "approval requested for the quarterly report",
    ];
    for (i, body) in notes.iter().enumerate() {
        sqlx::query("INSERT INTO notes (id, body) VALUES ($1, $2)")
            .bind(i as i32)
            .bind(*body)
            .execute(&mut db)
            .await
            .expect("insert a note");
    }
    let plan: Vec<String> =
        sqlx::query_scalar("EXPLAIN SELECT id FROM notes WHERE 'convrsation memory' <% body")
            .fetch_all(&mut db)
            .await
            .expect("explain the trigram query");
    assert!(
        plan.iter().any(|l| l.contains("notes_trgm")),
        "the trigram query does not use notes_trgm: {plan:#?}"
    );
    let hits: Vec<(i32, f32)> = sqlx::query_as(
        "SELECT id, word_similarity($1, body) AS s FROM notes \
         WHERE $1 <% body ORDER BY s DESC, id",
    )
    .bind("convrsation memory")
    .fetch_all(&mut db)
    .await
    .expect("trigram similarity query");
    assert_eq!(
        hits.first().map(|h| h.0),
        Some(1),
        "the note about conversation memory first: {hits:?}"
    );
    assert!(hits[0].1 > 0.5, "word similarity {}", hits[0].1);
    let unrelated: f32 = sqlx::query_scalar("SELECT similarity('conversation', 'quarterly')")
        .fetch_one(&mut db)
        .await
        .expect("similarity");
    assert!(unrelated < 0.1, "similarity of unrelated words {unrelated}");
}

/// `SHOW name` on `conn`.
async fn show(conn: &mut sqlx::PgConnection, name: &str) -> String {
    sqlx::query_scalar::<_, String>(&format!("SHOW {name}"))
        .fetch_one(conn)
        .await
        .unwrap_or_else(|e| panic!("SHOW {name}: {e}"))
}

/// assemble's snapshot (`api::memory::snapshot`, what `gather` reads in)
/// sets the HNSW scan settings it is given for its own transaction only:
/// inside it `SHOW` gives them; after it, on the same connection, pgvector's
/// defaults are back; without settings (the full-text path) it sets none.
#[tokio::test]
async fn the_snapshot_sets_the_hnsw_scan_settings_for_its_transaction_only() {
    use flowledger::config::{HnswSearch, IterativeScan};
    let url = pgvector_database().await;
    // one connection: what a snapshot left behind would show in the next
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .expect("connect");
    // the vector library loaded in the session, so its settings are defined
    sqlx::query("SELECT '[1,2]'::vector <=> '[2,1]'::vector")
        .execute(&pool)
        .await
        .expect("pgvector");
    for (ef_search, scan) in [
        (7, IterativeScan::StrictOrder),
        (1000, IterativeScan::RelaxedOrder),
        (100, IterativeScan::Off),
    ] {
        let set = HnswSearch {
            ef_search,
            iterative_scan: scan,
        };
        let mut tx = flowledger::api::memory::snapshot(&pool, 2_000, Some(set))
            .await
            .unwrap_or_else(|e| panic!("snapshot: {}", e.error.message));
        assert_eq!(show(&mut tx, "hnsw.ef_search").await, ef_search.to_string());
        assert_eq!(show(&mut tx, "hnsw.iterative_scan").await, scan.as_str());
        assert_eq!(show(&mut tx, "transaction_read_only").await, "on");
        tx.rollback().await.expect("rollback");
        let mut conn = pool.acquire().await.expect("the connection again");
        assert_eq!(show(&mut conn, "hnsw.ef_search").await, "40");
        assert_eq!(show(&mut conn, "hnsw.iterative_scan").await, "off");
    }
    let mut tx = flowledger::api::memory::snapshot(&pool, 2_000, None)
        .await
        .unwrap_or_else(|e| panic!("snapshot: {}", e.error.message));
    assert_eq!(show(&mut tx, "hnsw.ef_search").await, "40");
    tx.rollback().await.expect("rollback");
}
