//! Writing new rows with `COPY ... FROM STDIN (FORMAT binary)`: PostgreSQL's
//! fastest way in, about twice the speed of `INSERT ... SELECT FROM UNNEST`
//! for a batch of thousands of rows (docs/BENCHMARKS.md). The encoder knows
//! the few column types the read models use; the format is PostgreSQL's
//! documented binary COPY format (header, then per row a field count and
//! length-prefixed big-endian values, then a -1 trailer).

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// Rows in binary COPY format for a fixed column list, built value by value.
pub struct CopyRows {
    buf: Vec<u8>,
    /// The target columns, comma-separated, as in `COPY t (columns)`.
    columns: &'static str,
    count: i16,
    rows: usize,
}

impl CopyRows {
    /// Rows for `columns` ("a, b, c"); each row takes one value per column,
    /// in that order.
    pub fn new(columns: &'static str) -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
                                                    // a read model has a few dozen columns at most
        let count = i16::try_from(columns.split(',').count()).unwrap_or(i16::MAX);
        CopyRows {
            buf,
            columns,
            count,
            rows: 0,
        }
    }

    /// Starts a row; exactly one value per column must follow.
    pub fn row(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&self.count.to_be_bytes());
        self.rows += 1;
        self
    }

    /// How many rows were started.
    pub fn rows(&self) -> usize {
        self.rows
    }

    fn value(&mut self, bytes: &[u8]) -> &mut Self {
        // A read-model value over 2 GiB cannot come from a NATS message
        // (1 MiB default, 64 MiB at most).
        let len = i32::try_from(bytes.len()).unwrap_or(i32::MAX);
        self.buf.extend_from_slice(&len.to_be_bytes());
        self.buf.extend_from_slice(bytes);
        self
    }

    /// A SQL `NULL` for the next column (any type).
    pub fn null(&mut self) -> &mut Self {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
        self
    }

    /// A `smallint`.
    pub fn i16(&mut self, v: i16) -> &mut Self {
        self.value(&v.to_be_bytes())
    }

    /// An `int`, or `NULL`.
    pub fn i32(&mut self, v: Option<i32>) -> &mut Self {
        match v {
            Some(v) => self.value(&v.to_be_bytes()),
            None => self.null(),
        }
    }

    /// A `bigint`, or `NULL`.
    pub fn i64(&mut self, v: Option<i64>) -> &mut Self {
        match v {
            Some(v) => self.value(&v.to_be_bytes()),
            None => self.null(),
        }
    }

    /// `text`, `varchar` and `char(n)` share the binary format: the UTF-8 bytes.
    pub fn text(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.value(v.as_bytes()),
            None => self.null(),
        }
    }

    /// `jsonb` from JSON text: a version byte (1), then the text.
    pub fn jsonb(&mut self, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => {
                let len = i32::try_from(v.len() + 1).unwrap_or(i32::MAX);
                self.buf.extend_from_slice(&len.to_be_bytes());
                self.buf.push(1);
                self.buf.extend_from_slice(v.as_bytes());
                self
            }
            None => self.null(),
        }
    }

    /// A `uuid`: its 16 bytes.
    pub fn uuid(&mut self, v: &uuid::Uuid) -> &mut Self {
        self.value(v.as_bytes())
    }

    /// `timestamptz`: microseconds since 2000-01-01 UTC (sub-microsecond
    /// digits are truncated, as sqlx does when it binds a `DateTime`).
    pub fn timestamptz(&mut self, v: Option<DateTime<Utc>>) -> &mut Self {
        match v {
            Some(t) => self.value(&(t.timestamp_micros() - PG_EPOCH_OFFSET_MICROS).to_be_bytes()),
            None => self.null(),
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }

    /// Copies the rows into `table` inside `tx`.
    pub async fn copy_into(
        self,
        tx: &mut Transaction<'_, Postgres>,
        table: &str,
    ) -> Result<u64, sqlx::Error> {
        if self.rows == 0 {
            return Ok(0);
        }
        let columns = self.columns;
        let mut copy = (**tx)
            .copy_in_raw(&format!(
                "COPY {table} ({columns}) FROM STDIN (FORMAT binary)"
            ))
            .await?;
        match copy.send(self.finish()).await {
            Ok(_) => copy.finish().await,
            Err(e) => {
                let _ = copy.abort("flowledger: could not send the rows").await;
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_header_row_and_trailer() {
        let mut rows = CopyRows::new("a, b, c");
        rows.row().i16(7).text(None).jsonb(Some("{}"));
        assert_eq!(rows.rows(), 1);
        let bytes = rows.finish();
        let mut want = b"PGCOPY\n\xff\r\n\0".to_vec();
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
        want.extend_from_slice(&[0, 3]); // three fields
        want.extend_from_slice(&[0, 0, 0, 2, 0, 7]); // i16 7
        want.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]); // NULL
        want.extend_from_slice(&[0, 0, 0, 3, 1, b'{', b'}']); // jsonb v1 "{}"
        want.extend_from_slice(&[0xff, 0xff]); // trailer
        assert_eq!(bytes, want);
    }

    #[test]
    fn timestamps_count_from_the_postgres_epoch() {
        let mut rows = CopyRows::new("t");
        let t = DateTime::parse_from_rfc3339("2000-01-01T00:00:01.000002Z")
            .expect("a valid RFC 3339 literal")
            .with_timezone(&Utc);
        rows.row().timestamptz(Some(t));
        let bytes = rows.finish();
        let field = &bytes[19 + 2 + 4..19 + 2 + 4 + 8];
        assert_eq!(field, 1_000_002i64.to_be_bytes());
    }
}
