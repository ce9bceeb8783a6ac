//! The Redis result cache for whitelisted reads (DESIGN.md "Result cache").
//!
//! `rules` decides what may be cached, `entry` what goes into Redis, `store` talks to Redis.
//! The session decides when (outside transactions, not pinned) and captures the answers.

mod entry;
mod normalize;
mod rules;
mod store;

pub use entry::{KeyParts, entry_key, replayable_frames, settings_digest};
pub use normalize::normalize;
pub use rules::{CachePlan, CacheRules, cacheable, version_name};
pub use store::{CacheStats, Fill, Lookup, LsnSource, ResultCache, StatsSnapshot};
