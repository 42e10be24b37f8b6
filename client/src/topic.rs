//! What a subscription asks for: [`Topic`], the public way to say it, and the [`Filter`] the
//! fan-out and the resume query match events against.

/// Which events a subscription wants.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Filter {
    /// `None`: every channel.
    pub channel: Option<String>,
    /// `None`: every user.
    pub user_id: Option<String>,
}

impl Filter {
    /// Whether an event of `channel` addressed to `user_id` is one this filter wants.
    pub fn matches(&self, channel: &str, user_id: &str) -> bool {
        self.channel.as_deref().is_none_or(|c| c == channel)
            && self.user_id.as_deref().is_none_or(|u| u == user_id)
    }
}

/// What a subscription wants: a channel (or all), optionally one user, optionally its own
/// buffer size.
///
/// ```
/// use pg_outbox_client::Topic;
/// let topic = Topic::channel("chat").user("u1").buffer(64);
/// ```
#[derive(Clone, Debug)]
pub struct Topic {
    pub(crate) filter: Filter,
    pub(crate) buffer: Option<usize>,
}

impl Topic {
    /// Every channel, every user.
    pub fn all() -> Topic {
        Topic {
            filter: Filter {
                channel: None,
                user_id: None,
            },
            buffer: None,
        }
    }

    /// One channel, every user.
    pub fn channel(channel: impl Into<String>) -> Topic {
        let mut topic = Topic::all();
        topic.filter.channel = Some(channel.into());
        topic
    }

    /// Only the events addressed to this user (`Topic::all().user(id)`: every channel, one
    /// user, what a user's SSE or websocket connection needs).
    pub fn user(mut self, user_id: impl Into<String>) -> Topic {
        self.filter.user_id = Some(user_id.into());
        self
    }

    /// This subscription's buffer, in events, instead of the relay's `subscriber_buffer`: how
    /// many it may have queued, besides the batch it is reading, before it lags. At least 1,
    /// as for [`RelayBuilder::subscriber_buffer`](crate::RelayBuilder::subscriber_buffer)
    /// (which refuses 0 when the relay is built): `subscribe_to` takes 0 as 1, and logs a
    /// warning.
    pub fn buffer(mut self, events: usize) -> Topic {
        self.buffer = Some(events);
        self
    }
}
