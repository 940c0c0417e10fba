//! PostgreSQL read models built from the log (issue 3). Nothing here yet:
//! the event log (src/events) is the only source of truth so far.
