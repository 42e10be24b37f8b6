//! Which events a relay passes on, decided once when it is built: the channels it relays and
//! the origin it leaves out (which notifications are taken at their word is the keyring's, which
//! the database gives at each connection). The live stream and a resumed subscription's
//! catch-up both ask this one value, so they cannot drift apart.

use crate::incoming::Notice;
use crate::keyring::Opened;

/// The rules of one relay; nothing changes them once it runs.
#[derive(Clone, Debug, Default)]
pub(crate) struct Policy {
    /// Empty: every channel.
    channels: Vec<String>,
    instance_id: Option<String>,
    deliver_own_origin: bool,
}

impl Policy {
    pub fn new(
        channels: Vec<String>,
        instance_id: Option<String>,
        deliver_own_origin: bool,
    ) -> Policy {
        Policy {
            channels,
            instance_id,
            deliver_own_origin,
        }
    }

    /// Whether the relay passes on events of `channel`.
    pub fn wants(&self, channel: &str) -> bool {
        self.channels.is_empty() || self.channels.iter().any(|c| c == channel)
    }

    /// The channels relayed, for the statements that filter on them; empty for every channel.
    pub fn channels(&self) -> &[String] {
        &self.channels
    }

    /// Whether an event published with `origin` is this relay's own, which it leaves out.
    pub fn is_own(&self, origin: Option<&str>) -> bool {
        !self.deliver_own_origin
            && self.instance_id.is_some()
            && origin == self.instance_id.as_deref()
    }

    pub fn instance_id(&self) -> Option<&str> {
        self.instance_id.as_deref()
    }

    /// The events an opened notification announces that this relay wants, each stripped of its
    /// inline payload unless the notification is [trusted](Opened::trusted) (its row is then
    /// read, as a reference's is).
    pub fn notices(&self, opened: Opened) -> Vec<Notice> {
        opened
            .notices
            .into_iter()
            .filter(|notice| self.wants(&notice.channel))
            .map(|mut notice| {
                if !opened.trusted {
                    notice.payload = None;
                }
                notice
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::incoming::decode;

    const DOCUMENT: &str = r#"{"v":1,"id":"01890a5d-ac96-774b-bcce-b302099a8057","channel":"chat","user_id":"u1","origin":null,"xid":745,"created_at_us":1764290000123456,"payload":{"n":1}}"#;

    fn opened(document: &str, trusted: bool) -> Opened {
        Opened {
            notices: decode(document).unwrap(),
            trusted,
        }
    }

    #[test]
    fn untrusted_payloads_are_read_from_the_table() {
        let policy = Policy::new(Vec::new(), None, false);
        assert!(policy.notices(opened(DOCUMENT, true))[0].payload.is_some());
        assert!(policy.notices(opened(DOCUMENT, false))[0].payload.is_none());
    }

    #[test]
    fn channels_and_own_origin() {
        let policy = Policy::new(vec!["chat".into()], Some("me".into()), false);
        assert!(policy.wants("chat") && !policy.wants("audit"));
        assert!(policy
            .notices(opened(&DOCUMENT.replace("chat", "audit"), true))
            .is_empty());
        assert!(policy.is_own(Some("me")));
        assert!(!policy.is_own(Some("you")) && !policy.is_own(None));
        let delivering = Policy::new(Vec::new(), Some("me".into()), true);
        assert!(delivering.wants("audit") && !delivering.is_own(Some("me")));
    }
}
