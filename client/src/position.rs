//! Where a subscription stands in the stream of committed events, as a token that any replica
//! can resume from: what a browser keeps as its SSE `Last-Event-ID`.
//!
//! A position is the set of events it has seen, written the way the relay's cursor writes its
//! own: a `pg_snapshot` *S* (every event whose transaction *S* sees was seen) and the events
//! seen beyond it, as `(xid, id)`. That set is exact whatever order publishers commit in, which
//! "the last id I saw" is not, and it names nothing local to one replica: the transaction ids
//! are the server's. A position also carries the server run it was issued on (a hash of the
//! system identifier, timeline and start time), because after a crash or failover the same
//! transaction ids may name other transactions.
//!
//! A subscription's position grows in two ways: each event it hands out joins the ids beyond
//! *S*, and each snapshot the relay has delivered everything under (its *watermark*) is joined
//! into *S*, which lets those ids go. So a position stays small: its size is set by the
//! transactions in flight when it was taken and the events delivered since the relay's last
//! advance, not by history.
//!
//! The token is `base64url` (no padding) of: a version byte, the server run (4 bytes), then
//! LEB128 varints: `xmin`, `xmax - xmin`, the count of running xids and each as a delta from
//! the previous (from `xmin` for the first), the count of ids beyond and each as `xid - xmin`
//! followed by the 16 bytes of the id.

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use uuid::Uuid;

use pg_outbox_wire::Snapshot;

use crate::rows::RowKey;

const VERSION: u8 = 1;

/// The longest token accepted, in characters: far beyond any position a relay issues (some
/// 24 characters per id beyond *S*, a byte or two per transaction in flight), and small enough
/// that decoding a hostile one costs nothing.
const MAX_TOKEN_CHARS: usize = 64 * 1024;

/// A point in the stream of committed events: the events a subscription has seen. Opaque;
/// its [`Display`](fmt::Display) form is a URL-safe token (`[A-Za-z0-9_-]`) that
/// [`Relay::subscribe_from`](crate::Relay::subscribe_from) on any replica of the same database
/// resumes from.
///
/// Size: about 14 characters, plus 1.4 per transaction that was in flight at the relay's last
/// advance (a byte each while they are less than 128 xids apart), plus 23 to 24 per event this
/// subscription was handed since that advance (the relay advances at least every `sweep_interval` and, under a
/// flood of inline events, every 2,000 events; with references, at every fetch), except after
/// the last event an advance settled for it, which the advance's snapshot covers. A per-user
/// subscription's token is typically 14 to 40 characters (`make bench`: 20 bytes of `id:` line
/// per SSE event at 1,000 to 5,000 events/s).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Position {
    epoch: u32,
    snapshot: Snapshot,
    /// Events seen whose transaction `snapshot` does not see, in the order they were seen.
    beyond: Vec<RowKey>,
}

/// A snapshot the relay has delivered everything under, on the server run `epoch`.
#[derive(Debug)]
pub(crate) struct Watermark {
    pub epoch: u32,
    pub snapshot: Snapshot,
    /// How the relay came to `epoch`, when it proved where the previous run's history holds.
    pub change: Option<RunChange>,
    /// How many times this relay had rewound (to a new server run) when it published this: a
    /// subscription that has joined a later generation (a catch-up answered after a rewind)
    /// skips what is still queued from an earlier one, which that catch-up read again from the
    /// history that survived.
    pub generation: u64,
}

impl Watermark {
    pub fn new(epoch: u32, snapshot: Snapshot) -> Watermark {
        Watermark {
            epoch,
            snapshot,
            change: None,
            generation: 0,
        }
    }
}

/// A change of server run the relay went through: positions issued on `from` are exact on the
/// next run below `floor` (every transaction below it survived; none the relay saw from it
/// on did).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RunChange {
    pub from: u32,
    pub floor: u64,
}

/// Transaction ids from here on are refused in a token: no server gets near them (a `xid8` grows
/// by its 32-bit epoch), and arithmetic on them stays far from overflowing.
const MAX_XID: u64 = 1 << 62;

/// A token that is not a position: damaged, truncated, or not made by this client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("not a pg_outbox position: {reason}")]
pub struct PositionError {
    reason: &'static str,
}

fn invalid(reason: &'static str) -> PositionError {
    PositionError { reason }
}

impl Position {
    /// Everything under `watermark`, nothing beyond.
    pub(crate) fn at(watermark: &Watermark) -> Position {
        Position {
            epoch: watermark.epoch,
            snapshot: watermark.snapshot.clone(),
            beyond: Vec::new(),
        }
    }

    /// The server run this position was issued on.
    pub(crate) fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Its snapshot *S*.
    pub(crate) fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    /// The transaction ids of the events seen beyond *S*.
    pub(crate) fn beyond_xids(&self) -> impl Iterator<Item = u64> + '_ {
        self.beyond.iter().map(|row| row.xid)
    }

    /// Whether the row was seen.
    pub(crate) fn covers(&self, row: RowKey) -> bool {
        self.snapshot.is_visible(row.xid) || self.beyond.contains(&row)
    }

    /// The events seen beyond *S*, for checking many rows against a position whose list may be
    /// long (a token's: up to some 2,700 ids).
    pub(crate) fn seen_beyond(&self) -> HashSet<RowKey> {
        self.beyond.iter().copied().collect()
    }

    /// Notes the row, which the caller knows was not seen, as seen.
    pub(crate) fn record(&mut self, row: RowKey) {
        if !self.snapshot.is_visible(row.xid) {
            self.beyond.push(row);
        }
    }

    /// Notes the row as seen, unless it was; tells whether it is new.
    pub(crate) fn see(&mut self, row: RowKey) -> bool {
        if self.covers(row) {
            return false;
        }
        self.record(row);
        true
    }

    /// Joins a snapshot everything under which was seen. A watermark of another server run
    /// means the relay moved to that run and rewound to what survived of the old one: the
    /// position is carried over below the floor the relay proved, or, without one, replaced.
    pub(crate) fn absorb(&mut self, watermark: &Watermark) {
        if watermark.epoch != self.epoch {
            match watermark.change {
                Some(change) if change.from == self.epoch => {
                    *self = self.carried_over(watermark.epoch, change.floor);
                }
                _ => {
                    *self = Position::at(watermark);
                    return;
                }
            }
        }
        self.snapshot = self.snapshot.union(&watermark.snapshot);
        let snapshot = &self.snapshot;
        self.beyond.retain(|row| !snapshot.is_visible(row.xid));
    }

    /// This position carried over to the server run `epoch`, whose history is the same as the
    /// one it was issued on below `floor` only: what it saw from `floor` on is gone.
    pub(crate) fn carried_over(&self, epoch: u32, floor: u64) -> Position {
        Position {
            epoch,
            snapshot: self.snapshot.below(floor),
            beyond: self
                .beyond
                .iter()
                .copied()
                .filter(|row| row.xid < floor)
                .collect(),
        }
    }

    fn to_bytes(&self) -> Vec<u8> {
        let snapshot = &self.snapshot;
        let xmin = snapshot.xmin();
        let mut out = Vec::with_capacity(16 + snapshot.xip().len() * 2 + self.beyond.len() * 20);
        out.push(VERSION);
        out.extend_from_slice(&self.epoch.to_le_bytes());
        put_varint(&mut out, xmin);
        put_varint(&mut out, snapshot.xmax() - xmin);
        put_varint(&mut out, snapshot.xip().len() as u64);
        let mut previous = xmin;
        for &xid in snapshot.xip() {
            put_varint(&mut out, xid - previous);
            previous = xid;
        }
        put_varint(&mut out, self.beyond.len() as u64);
        for row in &self.beyond {
            // Not visible in S, so at or above its xmin.
            put_varint(&mut out, row.xid - xmin);
            out.extend_from_slice(row.id.as_bytes());
        }
        out
    }

    fn from_bytes(bytes: &[u8]) -> Result<Position, PositionError> {
        let mut reader = Reader { bytes };
        if reader.byte()? != VERSION {
            return Err(invalid("an unknown version"));
        }
        let epoch = u32::from_le_bytes(reader.array()?);
        let xmin = reader.varint()?;
        let xmax = xmin
            .checked_add(reader.varint()?)
            .filter(|&xmax| xmax < MAX_XID)
            .ok_or(invalid("xmax is beyond any transaction id"))?;
        // Every entry takes at least one byte: a count beyond what is left is a lie, and is
        // refused before anything is allocated for it.
        let running = reader.count(1)?;
        let mut xip = Vec::with_capacity(running);
        let mut previous = xmin;
        for _ in 0..running {
            previous = previous
                .checked_add(reader.varint()?)
                .ok_or(invalid("a running xid overflows"))?;
            xip.push(previous);
        }
        let snapshot =
            Snapshot::from_parts(xmin, xmax, xip).ok_or(invalid("an impossible snapshot"))?;
        let seen = reader.count(17)?;
        let mut beyond = Vec::with_capacity(seen);
        let mut repeated = HashSet::with_capacity(seen);
        for _ in 0..seen {
            let xid = xmin
                .checked_add(reader.varint()?)
                .filter(|&xid| xid < MAX_XID)
                .ok_or(invalid("an xid is beyond any transaction id"))?;
            let id = Uuid::from_bytes(reader.array()?);
            let row = RowKey { xid, id };
            if snapshot.is_visible(xid) || !repeated.insert(row) {
                return Err(invalid("an id beyond the snapshot is not beyond it"));
            }
            beyond.push(row);
        }
        if !reader.bytes.is_empty() {
            return Err(invalid("bytes after the end"));
        }
        Ok(Position {
            epoch,
            snapshot,
            beyond,
        })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.to_bytes()))
    }
}

impl FromStr for Position {
    type Err = PositionError;

    fn from_str(token: &str) -> Result<Position, PositionError> {
        if token.len() > MAX_TOKEN_CHARS {
            return Err(invalid("longer than any position"));
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(token.trim())
            .map_err(|_| invalid("not base64url"))?;
        Position::from_bytes(&bytes)
    }
}

/// What [`Relay::subscribe_from`](crate::Relay::subscribe_from) resumes from: a token as a
/// browser sends it back (`&str`, `String`), parsed there, or a position at hand.
impl TryFrom<&str> for Position {
    type Error = PositionError;

    fn try_from(token: &str) -> Result<Position, PositionError> {
        token.parse()
    }
}

impl TryFrom<&String> for Position {
    type Error = PositionError;

    fn try_from(token: &String) -> Result<Position, PositionError> {
        token.parse()
    }
}

impl TryFrom<String> for Position {
    type Error = PositionError;

    fn try_from(token: String) -> Result<Position, PositionError> {
        token.parse()
    }
}

impl From<&Position> for Position {
    fn from(position: &Position) -> Position {
        position.clone()
    }
}

/// A position at hand is never malformed.
impl From<Infallible> for PositionError {
    fn from(never: Infallible) -> PositionError {
        match never {}
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8 & 0x7f) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, PositionError> {
        let (&first, rest) = self.bytes.split_first().ok_or(invalid("truncated"))?;
        self.bytes = rest;
        Ok(first)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PositionError> {
        let (head, rest) = self
            .bytes
            .split_first_chunk::<N>()
            .ok_or(invalid("truncated"))?;
        self.bytes = rest;
        Ok(*head)
    }

    fn varint(&mut self) -> Result<u64, PositionError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = self.byte()?;
            let bits = u64::from(byte & 0x7f);
            if shift == 63 && bits > 1 {
                return Err(invalid("a number overflows"));
            }
            value |= bits << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(invalid("a number overflows"))
    }

    /// A count of entries each at least `entry_bytes` long.
    fn count(&mut self, entry_bytes: usize) -> Result<usize, PositionError> {
        let count = self.varint()?;
        match usize::try_from(count) {
            Ok(count) if count <= self.bytes.len() / entry_bytes => Ok(count),
            _ => Err(invalid("more entries than bytes")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> Snapshot {
        text.parse().unwrap()
    }

    fn watermark(epoch: u32, text: &str) -> Watermark {
        Watermark::new(epoch, snap(text))
    }

    fn key(xid: u64, n: u128) -> RowKey {
        RowKey {
            xid,
            id: Uuid::from_u128(n),
        }
    }

    #[test]
    fn a_token_reads_back_as_the_same_position_and_is_url_safe() {
        let mut position = Position::at(&watermark(7, "1000:1010:1000,1003,1004"));
        position.record(key(1003, 1));
        position.record(key(1012, u128::MAX));
        position.record(key(999, 3)); // seen already: under xmin
        let token = position.to_string();
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(token.parse::<Position>(), Ok(position.clone()));
        assert_eq!(position.beyond.len(), 2);
        // The size bound of the documentation: ~16 + ~1.4 per running xid + <= 24 per id.
        assert!(token.len() <= 16 + 3 * 2 + 2 * 24, "{}", token.len());
    }

    #[test]
    fn a_position_is_small_with_many_transactions_in_flight() {
        let running: Vec<String> = (0..500).map(|n| (5_000_000 + n * 2).to_string()).collect();
        let position = Position::at(&watermark(
            1,
            &format!("5000000:5001000:{}", running.join(",")),
        ));
        let token = position.to_string();
        assert!(token.len() <= 16 + 500 * 14 / 10, "{}", token.len());
        assert_eq!(token.parse::<Position>(), Ok(position));
    }

    #[test]
    fn watermarks_let_the_ids_beyond_go() {
        let mut position = Position::at(&watermark(1, "100:103:100,101"));
        position.record(key(101, 1));
        position.record(key(104, 2));
        assert!(position.covers(key(101, 1)) && !position.covers(key(101, 9)));
        position.absorb(&watermark(1, "101:105:101"));
        // 100 and 104 are seen now; 101 only through its id.
        assert_eq!(position.beyond, [key(101, 1)]);
        assert!(position.covers(key(100, 5)) && position.covers(key(104, 2)));
        position.absorb(&watermark(1, "106:106:"));
        assert!(position.beyond.is_empty());
        assert_eq!(position.snapshot().to_string(), "106:106:");
        // Another server run's watermark replaces it, unless the relay proved a floor.
        position.record(key(107, 3));
        let mut carried = position.clone();
        position.absorb(&watermark(2, "50:50:"));
        assert_eq!(position, Position::at(&watermark(2, "50:50:")));
        carried.absorb(&Watermark {
            change: Some(RunChange {
                from: 1,
                floor: 107,
            }),
            ..watermark(2, "104:104:")
        });
        assert_eq!(carried.epoch(), 2);
        assert_eq!(carried.snapshot().to_string(), "106:106:");
        assert!(carried.beyond.is_empty(), "107 is gone with the old run");
    }

    #[test]
    fn carried_over_keeps_only_the_history_under_the_floor() {
        let mut position = Position::at(&watermark(1, "100:110:105"));
        position.record(key(105, 1));
        position.record(key(112, 2));
        let carried = position.carried_over(2, 108);
        assert_eq!(carried.epoch(), 2);
        assert_eq!(carried.snapshot().to_string(), "100:108:105");
        assert_eq!(carried.beyond, [key(105, 1)]);
    }

    #[test]
    fn hostile_tokens_are_errors_never_panics() {
        let good = {
            let mut position = Position::at(&watermark(3, "10:20:12,15"));
            position.record(key(15, 42));
            position.to_bytes()
        };
        // Every truncation, and every single-byte corruption, is an error or another valid
        // position: never a panic.
        for end in 0..good.len() {
            assert!(Position::from_bytes(&good[..end]).is_err(), "{end}");
        }
        for at in 0..good.len() {
            for byte in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut bad = good.clone();
                bad[at] = byte;
                let _ = Position::from_bytes(&bad);
            }
        }
        for token in [
            "",
            "!",
            "AQ",
            "====",
            &"A".repeat(MAX_TOKEN_CHARS + 1),
            // a count of 2^63 running xids
            &URL_SAFE_NO_PAD.encode([
                1, 0, 0, 0, 0, 1, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
            ]),
        ] {
            assert!(token.parse::<Position>().is_err(), "{token:?}");
        }
        // An xid beyond any a server hands out, where `xid + 1` would overflow.
        let mut huge = vec![1, 1, 0, 0, 0, 0, 10, 0, 1];
        put_varint(&mut huge, u64::MAX);
        huge.extend_from_slice(&[7; 16]);
        assert!(Position::from_bytes(&huge).is_err());
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(Position::from_bytes(&trailing).is_err());
        // An id "beyond" that the snapshot already sees.
        let mut position = Position::at(&watermark(3, "10:20:12"));
        position.beyond.push(key(11, 1));
        assert!(Position::from_bytes(&position.to_bytes()).is_err());
    }

    #[test]
    fn varints_round_trip_at_their_edges() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            let mut reader = Reader { bytes: &out };
            assert_eq!(reader.varint(), Ok(value));
            assert!(reader.bytes.is_empty());
        }
        let mut reader = Reader {
            bytes: &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02],
        };
        assert!(reader.varint().is_err());
    }
}
