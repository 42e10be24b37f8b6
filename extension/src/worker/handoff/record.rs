//! The record format: a header (length, database, xid), then each event:
//! id (16 bytes), created_at_us (i64), the lengths of channel, user id (u16 each), origin (u16,
//! ABSENT_16 for NULL) and payload (u32, ABSENT_32 when not handed over), then those bytes. The
//! payload is the jsonb value itself, so the notifier renders it only if it sends it inline.

use pgrx::prelude::*;
use uuid::Uuid;

use crate::notification::{jsonb_text, Notification};

pub(super) const RECORD_HEADER: usize = 4 + 4 + 8;
const ABSENT_16: u16 = u16::MAX;
const ABSENT_32: u32 = u32::MAX;

/// The record of one committed transaction, as the notifier drained it.
pub struct Record {
    pub database: u32,
    pub xid: u64,
    pub events: Vec<HandedEvent>,
}

/// One event of a [`Record`].
pub struct HandedEvent {
    id: Uuid,
    created_at_us: i64,
    channel: String,
    user_id: String,
    origin: Option<String>,
    /// The jsonb value, with its varlena header, when it was small enough to go inline.
    payload: Option<Vec<u8>>,
}

impl HandedEvent {
    pub fn notification(&self, xid: u64) -> Notification<'_> {
        Notification {
            id: self.id,
            channel: &self.channel,
            user_id: &self.user_id,
            origin: self.origin.as_deref(),
            xid,
            created_at_us: self.created_at_us,
        }
    }

    /// The payload as JSON text, when it was handed over.
    pub fn payload_json(&self) -> Option<String> {
        let bytes = self.payload.as_ref()?;
        // SAFETY: a palloc'd copy is aligned as a varlena must be; the bytes are a whole jsonb
        // value with its 4-byte header, written by `encode_event`.
        unsafe {
            let copy = pg_sys::palloc(bytes.len()).cast::<u8>();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), copy, bytes.len());
            let json = jsonb_text(pg_sys::Datum::from(copy));
            pg_sys::pfree(copy.cast());
            Some(json)
        }
    }
}

/// The buffer held bytes that are not records as [`encode_event`] writes them.
#[derive(Debug)]
pub struct Malformed;

/// Appends one event to `out`. `payload` is a whole jsonb value with its varlena header.
pub(super) fn encode_event(out: &mut Vec<u8>, event: &Notification, payload: Option<&[u8]>) {
    out.extend_from_slice(event.id.as_bytes());
    out.extend_from_slice(&event.created_at_us.to_ne_bytes());
    // The lengths are bounded by outbox_publish's checks: 63, 1024 and 255 bytes.
    let len16 = |s: &str| u16::try_from(s.len()).unwrap_or(ABSENT_16 - 1);
    out.extend_from_slice(&len16(event.channel).to_ne_bytes());
    out.extend_from_slice(&len16(event.user_id).to_ne_bytes());
    out.extend_from_slice(&event.origin.map_or(ABSENT_16, len16).to_ne_bytes());
    let payload_len = payload.map_or(ABSENT_32, |p| p.len() as u32);
    out.extend_from_slice(&payload_len.to_ne_bytes());
    out.extend_from_slice(event.channel.as_bytes());
    out.extend_from_slice(event.user_id.as_bytes());
    out.extend_from_slice(event.origin.unwrap_or_default().as_bytes());
    out.extend_from_slice(payload.unwrap_or_default());
}

/// Reads the records in `bytes`, as the buffer held them.
pub(super) fn decode_records(mut bytes: &[u8]) -> Result<Vec<Record>, Malformed> {
    let mut records = Vec::new();
    while !bytes.is_empty() {
        let mut header = Reader(bytes);
        let len = header.u32()? as usize;
        let database = header.u32()?;
        let xid = header.u64()?;
        if len < RECORD_HEADER || len > bytes.len() {
            return Err(Malformed);
        }
        let mut events = Reader(&bytes[RECORD_HEADER..len]);
        bytes = &bytes[len..];
        let mut record = Record {
            database,
            xid,
            events: Vec::new(),
        };
        while !events.0.is_empty() {
            record.events.push(events.event()?);
        }
        records.push(record);
    }
    Ok(records)
}

/// Reads the fields [`encode_event`] writes, refusing any that would run past the end.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], Malformed> {
        let (taken, rest) = self.0.split_at_checked(n).ok_or(Malformed)?;
        self.0 = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        self.take(N)?.try_into().map_err(|_| Malformed)
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        self.array().map(u16::from_ne_bytes)
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        self.array().map(u32::from_ne_bytes)
    }

    fn u64(&mut self) -> Result<u64, Malformed> {
        self.array().map(u64::from_ne_bytes)
    }

    fn text(&mut self, len: usize) -> Result<String, Malformed> {
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| Malformed)
    }

    fn event(&mut self) -> Result<HandedEvent, Malformed> {
        let id = Uuid::from_bytes(self.array()?);
        let created_at_us = i64::from_ne_bytes(self.array()?);
        let channel_len = self.u16()?;
        let user_id_len = self.u16()?;
        let origin_len = self.u16()?;
        let payload_len = self.u32()?;
        Ok(HandedEvent {
            id,
            created_at_us,
            channel: self.text(channel_len.into())?,
            user_id: self.text(user_id_len.into())?,
            origin: match origin_len {
                ABSENT_16 => None,
                len => Some(self.text(len.into())?),
            },
            payload: match payload_len {
                ABSENT_32 => None,
                len => Some(self.take(len as usize)?.to_vec()),
            },
        })
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use super::{decode_records, encode_event, Malformed, RECORD_HEADER};
    use crate::notification::Notification;

    fn record(xid: u64, events: &[(Notification, Option<&[u8]>)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (event, payload) in events {
            encode_event(&mut body, event, *payload);
        }
        let mut record = Vec::new();
        record.extend_from_slice(&((RECORD_HEADER + body.len()) as u32).to_ne_bytes());
        record.extend_from_slice(&5_u32.to_ne_bytes());
        record.extend_from_slice(&xid.to_ne_bytes());
        record.extend_from_slice(&body);
        record
    }

    fn event<'a>(channel: &'a str, origin: Option<&'a str>) -> Notification<'a> {
        Notification {
            id: uuid::Uuid::now_v7(),
            channel,
            user_id: "ü-1",
            origin,
            xid: 0,
            created_at_us: -7,
        }
    }

    #[pg_test]
    fn records_read_back_as_written_and_a_cut_or_garbled_one_is_refused() {
        let first = [event("chat", None), event("a", Some("pod-1"))];
        let second = [event("c", Some(""))];
        let payload = [9_u8, 0, 0, 0, 1];
        let mut bytes = record(
            42,
            &[(first[0].clone(), Some(&payload)), (first[1].clone(), None)],
        );
        bytes.extend(record(41, &[(second[0].clone(), None)]));

        let records = decode_records(&bytes).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!((records[0].database, records[0].xid), (5, 42));
        assert_eq!(records[1].xid, 41);
        let decoded: Vec<_> = records
            .iter()
            .flat_map(|r| r.events.iter().map(|e| e.notification(r.xid)))
            .collect();
        for (got, want) in decoded.iter().zip(first.iter().chain(&second)) {
            assert_eq!(
                (
                    got.id,
                    got.channel,
                    got.user_id,
                    got.origin,
                    got.created_at_us
                ),
                (
                    want.id,
                    want.channel,
                    want.user_id,
                    want.origin,
                    want.created_at_us
                )
            );
        }
        assert_eq!(records[0].events[0].payload.as_deref(), Some(&payload[..]));
        assert_eq!(records[0].events[1].payload, None);

        for cut in 1..bytes.len() {
            if cut == bytes.len() - record(41, &[(second[0].clone(), None)]).len() {
                continue; // A whole first record.
            }
            assert!(
                matches!(decode_records(&bytes[..cut]), Err(Malformed)),
                "cut at {cut}"
            );
        }
        let mut garbled = bytes.clone();
        garbled[RECORD_HEADER + 16 + 8 + 6 + 4] = 0xff; // The first byte of the channel.
        assert!(decode_records(&garbled).is_err());
    }

    #[pg_test]
    fn a_handed_over_payload_renders_as_jsonb_prints_it() {
        let json = r#"{"n": 1, "text": "hé \"quoted\""}"#;
        let datum = Spi::get_one_with_args::<pgrx::JsonB>("SELECT $1::jsonb", &[json.into()])
            .unwrap()
            .unwrap()
            .into_datum()
            .unwrap();
        // SAFETY: a jsonb datum just built, detoasted as `stage` does.
        let raw = unsafe {
            let value = pg_sys::pg_detoast_datum(datum.cast_mut_ptr());
            std::slice::from_raw_parts(value.cast::<u8>(), pgrx::varlena::varsize_any(value))
        };
        let record = record(1, &[(event("chat", None), Some(raw))]);
        let records = decode_records(&record).unwrap();
        let expected = Spi::get_one_with_args::<String>("SELECT $1::jsonb::text", &[json.into()])
            .unwrap()
            .unwrap();
        assert_eq!(records[0].events[0].payload_json(), Some(expected));
    }
}
