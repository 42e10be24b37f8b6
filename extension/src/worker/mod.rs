//! The background workers pg_outbox registers when it is preloaded: the pruner deletes expired
//! events, the notifier sends the notifications of transactions that deferred them, which hand
//! their events over to it through shared memory ([`handoff`]).

pub mod handoff;
pub mod notifier;
pub mod pruner;
pub mod session;
pub mod shared;

/// Registers both workers (and the notifier's shared memory); called from `_PG_init` while
/// preloading.
pub fn register() {
    pruner::register();
    notifier::register();
}
