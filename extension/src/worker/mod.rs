//! The background workers pg_outbox registers when it is preloaded.

pub mod pruner;

pub use pruner::register;
