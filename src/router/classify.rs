//! TEMPORARY stand-in until the real classifier lands (being written in parallel).
use super::{Classification, Target};
pub fn classify(sql: &str) -> Classification {
    let s = sql.trim_start().to_ascii_lowercase();
    let mut c = Classification::unknown();
    if s.starts_with("select") && !s.contains("for update") {
        c.target = Target::Replica;
        c.parsed = true;
    }
    c
}
