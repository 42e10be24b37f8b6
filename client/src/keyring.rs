//! The keys a relay opens sealed notifications with, and whether it expects every notification
//! sealed: read from the database (`outbox_relay_keys()`) when the relay connects, and again
//! when a sealed notification does not open (the keys were rotated). Nothing to configure: the
//! keys go to exactly the roles that may read `event_outbox.payload`.

use pg_outbox_wire::seal::{self, OpenError};
use pg_outbox_wire::SealKey;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

use crate::error::{Error, Kind};
use crate::incoming::Notice;
use crate::incoming::{decode, ReadError};

/// What the relay's session of the database says about sealing.
#[derive(Debug, Default)]
pub(crate) struct Keyring {
    /// Every key not yet expired, the current one first.
    keys: Vec<SealKey>,
    /// `pg_outbox.notify_payload` is `sealed`: an unsealed notification was not sent by
    /// `outbox_publish` (or by a publisher whose role sets another mode: its rows are swept).
    sealed_only: bool,
    /// `pg_outbox.notify_payload` is `inline`: the database sends payloads in the clear, and
    /// unsealed inline notifications are taken at their word, as that mode accepts.
    trusts_unsealed: bool,
}

/// A notification opened: the events it announces, and whether what they carry can be taken
/// at its word.
#[derive(Debug)]
pub(crate) struct Opened {
    pub notices: Vec<Notice>,
    /// Sealed with one of the keys; or unsealed in `inline` mode, or from an extension older
    /// than 0.5.0, which has no keys.
    pub trusted: bool,
}

impl Keyring {
    /// Reads the keys and the mode. A database whose extension predates 0.5.0 has neither: its
    /// notifications are read as they come, as before.
    pub async fn load(client: &Client, schema: &str) -> Result<Keyring, Error> {
        let sql = format!("SELECT keys, notify_payload FROM {schema}.outbox_relay_keys()");
        let row = match client.query_one(&sql, &[]).await {
            Ok(row) => row,
            Err(err) if err.code() == Some(&SqlState::UNDEFINED_FUNCTION) => {
                return Ok(Keyring {
                    trusts_unsealed: true,
                    ..Keyring::default()
                })
            }
            Err(err) => return Err(Error::from_query(err, schema)),
        };
        let protocol = |e: tokio_postgres::Error| Error::from(Kind::Protocol(e.to_string()));
        let keys: Vec<Vec<u8>> = row.try_get(0).map_err(protocol)?;
        let mode: String = row.try_get(1).map_err(protocol)?;
        let keys = keys
            .into_iter()
            .filter_map(|bytes| <[u8; 32]>::try_from(bytes).ok())
            .map(SealKey::from_bytes)
            .collect();
        Ok(Keyring {
            keys,
            sealed_only: mode == "sealed",
            trusts_unsealed: mode == "inline",
        })
    }

    /// Opens a notification: a sealed one with the first key it opens with, a plain one as it
    /// is, unless the database seals every notification.
    pub fn open(&self, text: &str) -> Result<Opened, ReadError> {
        if !seal::is_sealed(text) {
            if self.sealed_only {
                return Err(ReadError::Unsealed);
            }
            return Ok(Opened {
                notices: decode(text)?,
                trusted: self.trusts_unsealed,
            });
        }
        if self.keys.is_empty() {
            return Err(ReadError::NoKey);
        }
        let mut failure = OpenError::Unauthentic;
        for key in &self.keys {
            match seal::open(key, text) {
                Ok(document) => {
                    return Ok(Opened {
                        notices: decode(&document)?,
                        trusted: true,
                    })
                }
                Err(OpenError::Malformed) => return Err(OpenError::Malformed.into()),
                Err(err) => failure = err,
            }
        }
        Err(failure.into())
    }

    #[cfg(test)]
    pub fn of(keys: Vec<SealKey>, mode: &str) -> Keyring {
        Keyring {
            keys,
            sealed_only: mode == "sealed",
            trusts_unsealed: mode == "inline",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCUMENT: &str = r#"{"v":1,"id":"01890a5d-ac96-774b-bcce-b302099a8057","channel":"chat","user_id":"u1","origin":null,"xid":745,"created_at_us":1764290000123456,"payload":{"n":1}}"#;

    #[test]
    fn sealed_mode_takes_only_what_opens_with_a_key() {
        let (old, new) = (SealKey::from_bytes([1; 32]), SealKey::from_bytes([2; 32]));
        let ring = Keyring::of(vec![new.clone(), old.clone()], "sealed");
        for key in [&old, &new] {
            let opened = ring.open(&seal::seal(key, DOCUMENT, [3; 24])).unwrap();
            assert!(opened.trusted && opened.notices[0].payload.is_some());
        }
        assert!(matches!(ring.open(DOCUMENT), Err(ReadError::Unsealed)));
        let other = seal::seal(&SealKey::from_bytes([9; 32]), DOCUMENT, [3; 24]);
        assert!(matches!(
            ring.open(&other),
            Err(ReadError::Open(OpenError::Unauthentic))
        ));
        assert!(ring.open(&other).unwrap_err().is_forged());
        assert!(!ring.open("s1.AAAA").unwrap_err().is_forged());
        assert!(matches!(
            Keyring::of(Vec::new(), "sealed").open(&other),
            Err(ReadError::NoKey)
        ));
    }

    #[test]
    fn only_inline_mode_takes_unsealed_payloads_at_their_word() {
        assert!(
            Keyring::of(Vec::new(), "inline")
                .open(DOCUMENT)
                .unwrap()
                .trusted
        );
        let reference = Keyring::of(vec![SealKey::from_bytes([1; 32])], "reference");
        assert!(!reference.open(DOCUMENT).unwrap().trusted);
    }
}
