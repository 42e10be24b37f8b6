//! The event a relay hands to its subscribers, and the other things a subscription can yield.

use std::fmt;
use std::sync::Arc;
use std::time::SystemTime;

use serde::de::DeserializeOwned;
use uuid::Uuid;

/// One published outbox row, as delivered to a subscriber.
///
/// Cheap to clone: every subscriber that matches shares the same allocation.
#[derive(Clone)]
pub struct Event(Arc<Inner>);

struct Inner {
    id: Uuid,
    channel: String,
    user_id: String,
    origin: Option<String>,
    xid: u64,
    created_at: SystemTime,
    payload: serde_json::Value,
}

impl Event {
    pub(crate) fn new(
        id: Uuid,
        channel: String,
        user_id: String,
        origin: Option<String>,
        xid: u64,
        created_at: SystemTime,
        payload: serde_json::Value,
    ) -> Event {
        Event(Arc::new(Inner {
            id,
            channel,
            user_id,
            origin,
            xid,
            created_at,
            payload,
        }))
    }

    /// The row's id (a UUIDv7).
    pub fn id(&self) -> Uuid {
        self.0.id
    }

    /// The channel it was published on.
    pub fn channel(&self) -> &str {
        &self.0.channel
    }

    /// The user it is addressed to.
    pub fn user_id(&self) -> &str {
        &self.0.user_id
    }

    /// The instance id of the replica that published it, if it gave one.
    pub fn origin(&self) -> Option<&str> {
        self.0.origin.as_deref()
    }

    /// The id of the publishing top-level transaction (`xid8`).
    pub fn xid(&self) -> u64 {
        self.0.xid
    }

    /// When it was published, by the database's clock (`clock_timestamp()`).
    pub fn created_at(&self) -> SystemTime {
        self.0.created_at
    }

    /// The payload as JSON.
    pub fn payload(&self) -> &serde_json::Value {
        &self.0.payload
    }

    /// Decodes the payload into `T`.
    ///
    /// A payload that does not fit `T` is an error for this event only; the relay is unaffected.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, DecodeError> {
        T::deserialize(&self.0.payload).map_err(|source| DecodeError {
            id: self.0.id,
            channel: self.0.channel.clone(),
            source,
        })
    }
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Event")
            .field("id", &self.0.id)
            .field("channel", &self.0.channel)
            .field("user_id", &self.0.user_id)
            .field("origin", &self.0.origin)
            .field("xid", &self.0.xid)
            .field("created_at", &self.0.created_at)
            .field("payload", &self.0.payload)
            .finish()
    }
}

/// An event's payload did not decode into the requested type.
#[derive(Debug, thiserror::Error)]
#[error("payload of event {id} on channel {channel:?} does not decode: {source}")]
pub struct DecodeError {
    /// The event's id.
    pub id: Uuid,
    /// The event's channel.
    pub channel: String,
    /// What serde said.
    #[source]
    pub source: serde_json::Error,
}

/// Events the relay knows it could not deliver.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Gap {
    /// Rows the relay had not read yet may have been pruned (retention passed while it was
    /// disconnected or behind). Sent to every subscriber: the lost events' channels are unknown.
    ///
    /// The check is conservative on one side: it is raised when the greatest pruned xid is at or
    /// above the relay's cursor horizon and not visible in it; see the crate documentation.
    Pruned {
        /// `outbox_prune_state.pruned_through_xid` when the gap was seen.
        pruned_through_xid: u64,
        /// The oldest transaction id the relay's cursor had not settled (`xmin` of its snapshot).
        cursor_xmin: u64,
    },
    /// A row's payload could not be read as JSON by this client (a number beyond `f64`, such
    /// as `1e400`, or nesting deeper than 128 levels: valid `jsonb`, but not for `serde_json`).
    /// The relay skips it and goes on. Sent to the subscribers of its channel and user, once
    /// each: the gap takes the row's place in a subscription's [`Position`](crate::Position),
    /// so a resume from a position past it does not report it again, and one from before it
    /// does.
    Unreadable {
        /// The row's id.
        id: Uuid,
        /// Its channel.
        channel: String,
        /// Its user.
        user_id: String,
        /// What the JSON parser said.
        reason: String,
    },
    /// The server lost part of the history the relay had read (a crash before commits that
    /// wrote no WAL of their own were flushed, a failover to a standby that was behind, a
    /// restore) and none of the rows the relay keeps as witnesses survived, so it cannot tell
    /// exactly where the old history ends. It reads again every transaction from `floor_xid` on
    /// (none it delivered from there exists any more); events of transactions below it that
    /// the server handed out again may be missing. Sent to every subscriber.
    ///
    /// When a witness survives (the usual case) the relay recovers exactly and reports nothing.
    Rewound {
        /// The transaction id from which the relay reads again.
        floor_xid: u64,
    },
    /// A row announced by a notification was gone when the relay fetched it, and pruning had
    /// reached its transaction (`outbox_prune_state.pruned_through_xid`): pruned before this
    /// relay read it. A notification naming a row that never was is no gap (see
    /// [`MetricsSnapshot::forged`](crate::MetricsSnapshot::forged)). Sent to the subscribers of
    /// its channel and user.
    Missing {
        /// The row's id.
        id: Uuid,
        /// Its channel.
        channel: String,
        /// Its user.
        user_id: String,
    },
}

impl Gap {
    /// A stable name for this kind of gap, for logs and wire formats: `pruned`, `unreadable`,
    /// `rewound` or `missing`.
    pub fn kind(&self) -> &'static str {
        match self {
            Gap::Pruned { .. } => "pruned",
            Gap::Unreadable { .. } => "unreadable",
            Gap::Rewound { .. } => "rewound",
            Gap::Missing { .. } => "missing",
        }
    }
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Gap::Pruned {
                pruned_through_xid, ..
            } => write!(
                f,
                "events may have been pruned (through xid {pruned_through_xid}) before the relay read them"
            ),
            Gap::Unreadable { id, reason, .. } => {
                write!(f, "event {id} has a payload this client cannot read: {reason}")
            }
            Gap::Rewound { floor_xid } => write!(
                f,
                "the server lost part of its history (crash, failover or restore); events of transactions below xid {floor_xid} may be missing"
            ),
            Gap::Missing { id, .. } => write!(f, "event {id} was gone when the relay read it"),
        }
    }
}

/// Why a resumed subscription could not go on exactly from the position it was given, and went
/// on from now instead: the app should reload the state it shows (for a browser: `event:
/// reset`), then follow the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ResetReason {
    /// The token is not a position: damaged, truncated, or not issued by this client.
    Malformed(crate::PositionError),
    /// Events the position had not seen may have been pruned: it is older than the retention.
    Expired {
        /// `outbox_prune_state.pruned_through_xid` when the subscription resumed.
        pruned_through_xid: u64,
        /// The oldest transaction id the position had not settled.
        position_xmin: u64,
    },
    /// The position was issued on a run of the server (before a restart, crash, failover or
    /// restore) that the database's history does not hold: the run was lost with a failover
    /// or a restore, or it came before the update to 0.6.0 and this relay did not go through
    /// the change.
    OtherServerRun,
    /// The position names transactions the server has not started: forged, or issued by a
    /// server whose history was lost.
    Ahead {
        /// The first transaction id the position claims not to have reached.
        position_xmax: u64,
        /// The server's when the subscription resumed.
        server_xmax: u64,
    },
}

impl ResetReason {
    /// A stable name for this reason, for logs and wire formats: `malformed`, `expired`,
    /// `other_server_run` or `ahead`.
    pub fn kind(&self) -> &'static str {
        match self {
            ResetReason::Malformed(_) => "malformed",
            ResetReason::Expired { .. } => "expired",
            ResetReason::OtherServerRun => "other_server_run",
            ResetReason::Ahead { .. } => "ahead",
        }
    }
}

impl fmt::Display for ResetReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ResetReason::Malformed(err) => write!(f, "{err}"),
            ResetReason::Expired { .. } => {
                f.write_str("the position is older than the events the outbox keeps")
            }
            ResetReason::OtherServerRun => f.write_str(
                "the position is from a run of the database server that its history does not hold",
            ),
            ResetReason::Ahead { .. } => {
                f.write_str("the position names transactions the server has not started")
            }
        }
    }
}

/// What a subscription yields, in the relay's delivery order (see the crate documentation).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum Delivery {
    /// The next event.
    Event(Event),
    /// This subscriber fell behind before the relay had a position to give it (before
    /// [`Relay::start`](crate::Relay::start) returned): its buffer was full and `missed` events
    /// were dropped for it (only for it) at this point of the stream. Afterwards a subscriber
    /// that falls behind reads what it missed from the outbox instead. Other subscribers were
    /// not slowed.
    Lagged {
        /// How many events were dropped for this subscriber.
        missed: u64,
    },
    /// Events this relay could not deliver: pruned or gone before it read them, or (for
    /// [`Gap::Unreadable`]) a payload this client cannot parse, which another client may.
    /// See [`Gap`] for which subscribers get each.
    Gap(Gap),
    /// A subscription resumed with [`Relay::subscribe_from`](crate::Relay::subscribe_from)
    /// could not resume exactly: it goes on with the live stream from here, and what it may
    /// have missed is unknown. Always its first item when it comes.
    Reset {
        /// Why.
        reason: ResetReason,
    },
}

impl Delivery {
    /// The event, if this is one.
    pub fn event(&self) -> Option<&Event> {
        match self {
            Delivery::Event(event) => Some(event),
            _ => None,
        }
    }

    /// The event, if this is one, by value.
    pub fn into_event(self) -> Option<Event> {
        match self {
            Delivery::Event(event) => Some(event),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Chat {
        text: String,
    }

    fn event(payload: serde_json::Value) -> Event {
        Event::new(
            Uuid::nil(),
            "chat".into(),
            "u1".into(),
            None,
            7,
            SystemTime::UNIX_EPOCH,
            payload,
        )
    }

    #[test]
    fn decodes_a_matching_payload() {
        let chat: Chat = event(serde_json::json!({"text": "hi"})).decode().unwrap();
        assert_eq!(chat.text, "hi");
    }

    #[test]
    fn a_mismatched_payload_is_an_error_naming_the_event() {
        let err = event(serde_json::json!({"txt": 1}))
            .decode::<Chat>()
            .unwrap_err();
        assert_eq!(err.channel, "chat");
        assert!(err.to_string().contains("chat"));
    }
}
