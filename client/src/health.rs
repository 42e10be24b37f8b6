//! The relay's health, readable at any time and awaitable on change.

use std::fmt;

/// Where the relay's listener is.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Health {
    /// Built, `start()` not called (or not finished) yet.
    NotStarted,
    /// LISTEN is in effect and the cursor is caught up to it: nothing committed from now on can
    /// be missed.
    Listening,
    /// The connection was lost; the relay is retrying with backoff. Events committed meanwhile
    /// are caught up once it is back.
    Reconnecting {
        /// Attempts made since the connection was lost (1 on the first retry).
        attempt: u32,
        /// Why the connection was lost, or why the last attempt failed.
        last_error: String,
    },
    /// Shut down (or its handle dropped); no event will be delivered any more.
    Stopped,
}

impl Health {
    /// Whether the relay is listening.
    pub fn is_listening(&self) -> bool {
        matches!(self, Health::Listening)
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Health::NotStarted => f.write_str("not started"),
            Health::Listening => f.write_str("listening"),
            Health::Reconnecting {
                attempt,
                last_error,
            } => write!(f, "reconnecting (attempt {attempt}): {last_error}"),
            Health::Stopped => f.write_str("stopped"),
        }
    }
}
