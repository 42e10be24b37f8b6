//! Which events a relay passes on, decided once when it is built: the channels it relays, the
//! origin it leaves out, and which notifications it takes at their word. The live stream and a
//! resumed subscription's catch-up both ask this one value, so they cannot drift apart.

use pg_outbox_wire::SealKey;

use crate::incoming::{self, Notice, ReadError};

/// The rules of one relay; nothing changes them once it runs.
#[derive(Clone, Debug, Default)]
pub(crate) struct Policy {
    /// Empty: every channel.
    channels: Vec<String>,
    instance_id: Option<String>,
    deliver_own_origin: bool,
    seal_key: Option<SealKey>,
}

impl Policy {
    pub fn new(
        channels: Vec<String>,
        instance_id: Option<String>,
        deliver_own_origin: bool,
        seal_key: Option<SealKey>,
    ) -> Policy {
        Policy {
            channels,
            instance_id,
            deliver_own_origin,
            seal_key,
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

    /// Whether what a notification carries can be taken at its word: a sealed one that opened
    /// with the relay's key can; so can any when the relay has no key (it reads inline payloads
    /// as they come); an unsealed one when the relay has a key cannot, since any role that can
    /// connect may have sent it.
    pub fn trusts(&self, opened: &incoming::Opened) -> bool {
        opened.sealed || self.seal_key.is_none()
    }

    /// The events a notification announces that this relay wants, each stripped of its inline
    /// payload unless [trusted](Policy::trusts) (its row is then read, as a reference's is).
    pub fn notices(&self, text: &str) -> Result<Vec<Notice>, ReadError> {
        let opened = incoming::open(text, self.seal_key.as_ref())?;
        let trusted = self.trusts(&opened);
        Ok(opened
            .notices
            .into_iter()
            .filter(|notice| self.wants(&notice.channel))
            .map(|mut notice| {
                if !trusted {
                    notice.payload = None;
                }
                notice
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use pg_outbox_wire::seal;

    use super::*;

    const DOCUMENT: &str = r#"{"v":1,"id":"01890a5d-ac96-774b-bcce-b302099a8057","channel":"chat","user_id":"u1","origin":null,"xid":745,"created_at_us":1764290000123456,"payload":{"n":1}}"#;

    fn keyed(key: Option<SealKey>) -> Policy {
        Policy::new(Vec::new(), None, false, key)
    }

    #[test]
    fn only_what_opens_with_the_key_is_taken_at_its_word() {
        let key = SealKey::from_bytes([9; 32]);
        let sealed = seal::seal(&key, DOCUMENT, [1; 24]);
        let with_key = keyed(Some(key.clone()));
        assert!(with_key.notices(&sealed).unwrap()[0].payload.is_some());
        // Unsealed: trusted only by a relay that expects nothing sealed.
        assert!(with_key.notices(DOCUMENT).unwrap()[0].payload.is_none());
        assert!(keyed(None).notices(DOCUMENT).unwrap()[0].payload.is_some());
        assert!(matches!(
            keyed(None).notices(&sealed),
            Err(ReadError::NoKey)
        ));
        let other = keyed(Some(SealKey::from_bytes([8; 32])));
        assert!(other.notices(&sealed).unwrap_err().is_forged());
        assert!(!with_key.notices("s1.AAAA").unwrap_err().is_forged());
    }

    #[test]
    fn channels_and_own_origin() {
        let policy = Policy::new(vec!["chat".into()], Some("me".into()), false, None);
        assert!(policy.wants("chat") && !policy.wants("audit"));
        assert!(policy
            .notices(&DOCUMENT.replace("chat", "audit"))
            .unwrap()
            .is_empty());
        assert!(policy.is_own(Some("me")));
        assert!(!policy.is_own(Some("you")) && !policy.is_own(None));
        let delivering = Policy::new(Vec::new(), Some("me".into()), true, None);
        assert!(delivering.wants("audit") && !delivering.is_own(Some("me")));
    }
}
