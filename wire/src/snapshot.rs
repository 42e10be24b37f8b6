//! `pg_snapshot` values: which transactions a snapshot sees, and the snapshots the relay and
//! the notifier derive from one (cut off below an xid, joined with another).

use std::fmt;
use std::str::FromStr;

/// A `pg_snapshot` (text form `xmin:xmax:xip1,xip2,…`): every transaction below `xmin` had
/// ended, none from `xmax` on had started, and between the two those listed had not ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    xmin: u64,
    xmax: u64,
    /// Sorted, without repeats, each in `xmin..xmax`.
    xip: Vec<u64>,
}

/// A snapshot's text form was not understood.
#[derive(Debug, thiserror::Error)]
#[error("invalid pg_snapshot {text:?}: {reason}")]
pub struct SnapshotParseError {
    text: String,
    reason: &'static str,
}

impl Snapshot {
    /// A snapshot from its parts, as read back from a compact form: `None` unless `xmin <=
    /// xmax` and `xip` is strictly increasing within `xmin..xmax`.
    pub fn from_parts(xmin: u64, xmax: u64, xip: Vec<u64>) -> Option<Snapshot> {
        let ordered = xip.windows(2).all(|pair| pair[0] < pair[1]);
        let inside = xip.first().is_none_or(|&first| first >= xmin)
            && xip.last().is_none_or(|&last| last < xmax);
        (xmin <= xmax && ordered && inside).then_some(Snapshot { xmin, xmax, xip })
    }

    /// The oldest transaction id still running in this snapshot: every xid below it is settled.
    pub fn xmin(&self) -> u64 {
        self.xmin
    }

    /// The first transaction id not yet assigned in this snapshot.
    pub fn xmax(&self) -> u64 {
        self.xmax
    }

    /// The transaction ids between `xmin` and `xmax` that had not ended, in order.
    pub fn xip(&self) -> &[u64] {
        &self.xip
    }

    /// Whether transaction `xid` had ended (committed or not) when this snapshot was taken, as
    /// `pg_visible_in_snapshot` decides it.
    pub fn is_visible(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && self.xip.binary_search(&xid).is_err())
    }

    /// This snapshot as it would have been had no transaction from `floor` on existed: every xid
    /// below `floor` is seen exactly as here, none from `floor` on.
    pub fn below(&self, floor: u64) -> Snapshot {
        let xmax = self.xmax.min(floor);
        Snapshot {
            xmin: self.xmin.min(xmax),
            xmax,
            xip: self.xip.iter().copied().filter(|&xid| xid < xmax).collect(),
        }
    }

    /// The snapshot that sees what `self` or `other` sees, and nothing else. Every xid below the
    /// greater `xmax` that neither sees is in one of the two lists, so this is a snapshot.
    pub fn union(&self, other: &Snapshot) -> Snapshot {
        let xmax = self.xmax.max(other.xmax);
        let mut xip: Vec<u64> = self
            .xip
            .iter()
            .chain(&other.xip)
            .copied()
            .filter(|&xid| !self.is_visible(xid) && !other.is_visible(xid))
            .collect();
        xip.sort_unstable();
        xip.dedup();
        Snapshot {
            xmin: xip.first().copied().unwrap_or(xmax),
            xmax,
            xip,
        }
    }
}

impl FromStr for Snapshot {
    type Err = SnapshotParseError;

    fn from_str(text: &str) -> Result<Snapshot, SnapshotParseError> {
        let err = |reason| SnapshotParseError {
            text: text.chars().take(200).collect(),
            reason,
        };
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next().ok_or_else(|| err("no xmin"))?;
        let xmax = parts.next().ok_or_else(|| err("no xmax"))?;
        let xip = parts.next().ok_or_else(|| err("no xip list"))?;
        let xmin: u64 = xmin.parse().map_err(|_| err("xmin is not a number"))?;
        let xmax: u64 = xmax.parse().map_err(|_| err("xmax is not a number"))?;
        if xmin > xmax {
            return Err(err("xmin is above xmax"));
        }
        let mut list = Vec::new();
        if !xip.is_empty() {
            for item in xip.split(',') {
                let xid: u64 = item
                    .parse()
                    .map_err(|_| err("an xip entry is not a number"))?;
                if xid < xmin || xid >= xmax {
                    return Err(err("an xip entry is outside xmin..xmax"));
                }
                list.push(xid);
            }
        }
        list.sort_unstable();
        list.dedup();
        Ok(Snapshot {
            xmin,
            xmax,
            xip: list,
        })
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (i, xid) in self.xip.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{xid}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(text: &str) -> Snapshot {
        text.parse().unwrap()
    }

    #[test]
    fn parses_and_prints_snapshots() {
        let s = snap("10:20:12,15");
        assert_eq!((s.xmin(), s.xmax(), s.xip()), (10, 20, &[12, 15][..]));
        assert_eq!(s.to_string(), "10:20:12,15");
        assert_eq!(snap("5:5:").to_string(), "5:5:");
        assert_eq!(snap("10:20:15,12,12").to_string(), "10:20:12,15");
        for bad in [
            "", "1", "1:2", "a:2:", "3:2:", "1:5:7", "1:5:0", "1:5:x", "-1:5:", "1:5:3,",
        ] {
            assert!(bad.parse::<Snapshot>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn visibility_follows_pg_visible_in_snapshot() {
        let s = snap("10:20:12,15");
        for (xid, visible) in [
            (0, true),
            (9, true),
            (10, true),
            (11, true),
            (12, false),
            (15, false),
            (19, true),
            (20, false),
            (u64::MAX, false),
        ] {
            assert_eq!(s.is_visible(xid), visible, "xid {xid}");
        }
        // xmin itself is normally in the xip list; when not, it is visible.
        let s = snap("10:20:10");
        assert!(!s.is_visible(10));
        assert!(s.is_visible(11));
    }

    #[test]
    fn from_parts_accepts_only_what_a_snapshot_can_be() {
        assert_eq!(
            Snapshot::from_parts(10, 20, vec![12, 15]),
            Some(snap("10:20:12,15"))
        );
        assert_eq!(Snapshot::from_parts(5, 5, vec![]), Some(snap("5:5:")));
        for (xmin, xmax, xip) in [
            (3, 2, vec![]),
            (10, 20, vec![15, 12]),
            (10, 20, vec![12, 12]),
            (10, 20, vec![9]),
            (10, 20, vec![20]),
        ] {
            assert_eq!(
                Snapshot::from_parts(xmin, xmax, xip.clone()),
                None,
                "{xip:?}"
            );
        }
    }

    #[test]
    fn below_keeps_what_a_snapshot_saw_under_the_floor() {
        let s = snap("100:110:102,105,108");
        for floor in [0, 99, 100, 103, 105, 109, 110, 200] {
            let b = s.below(floor);
            assert!(b.to_string().parse::<Snapshot>().is_ok(), "{b}");
            for xid in 90..120 {
                assert_eq!(
                    b.is_visible(xid),
                    s.is_visible(xid) && xid < floor,
                    "{floor} {xid}"
                );
            }
        }
    }
}
