//! `pg_snapshot` values as the notifier handles them: which transactions a snapshot sees, and
//! a snapshot cut off below a transaction id.

use std::fmt;

/// A `pg_snapshot`: every transaction below `xmin` has ended, none from `xmax` on had started,
/// and between the two those in `running` had not ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    pub xmin: u64,
    pub xmax: u64,
    running: Vec<u64>,
}

impl Snapshot {
    /// Reads the text form `xmin:xmax:xip,…` that PostgreSQL prints.
    pub fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let running = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(str::parse)
                .collect::<Result<_, _>>()
                .ok()?,
        };
        Some(Snapshot {
            xmin,
            xmax,
            running,
        })
    }

    /// Whether `xid` had ended when the snapshot was taken, as `pg_visible_in_snapshot` says:
    /// committed or not (a reader of the table tells the two apart by the rows it finds).
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.running.contains(&xid))
    }

    /// The snapshot as a reader would have seen it had no transaction from `bound` on existed:
    /// every xid below `bound` is seen exactly as here, none from `bound` on. A batch that ends
    /// there has sent exactly the rows below `bound`, and the rows of transactions still running
    /// here stay for later batches.
    pub fn below(&self, bound: u64) -> Snapshot {
        let xmax = self.xmax.min(bound);
        Snapshot {
            xmin: self.xmin.min(xmax),
            xmax,
            running: self
                .running
                .iter()
                .copied()
                .filter(|xid| *xid < xmax)
                .collect(),
        }
    }

    /// The snapshot that sees what `self` or `other` sees, and nothing else. Every xid below the
    /// greater `xmax` that neither sees is in one of the running lists, so this is a snapshot.
    pub fn union(&self, other: &Snapshot) -> Snapshot {
        let xmax = self.xmax.max(other.xmax);
        let mut running: Vec<u64> = self
            .running
            .iter()
            .chain(&other.running)
            .copied()
            .filter(|xid| !self.sees(*xid) && !other.sees(*xid))
            .collect();
        running.sort_unstable();
        running.dedup();
        Snapshot {
            xmin: running.first().copied().unwrap_or(xmax),
            xmax,
            running,
        }
    }
}

impl fmt::Display for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:", self.xmin, self.xmax)?;
        for (n, xid) in self.running.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{xid}")?;
        }
        Ok(())
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use super::Snapshot;

    /// PostgreSQL parses `snapshot` (rejecting a malformed one) and says whether it sees `xid`.
    fn postgres_sees(xid: u64, snapshot: &Snapshot) -> bool {
        Spi::get_one_with_args::<bool>(
            "SELECT pg_visible_in_snapshot($1::text::xid8, $2::text::pg_snapshot)",
            &[xid.to_string().into(), snapshot.to_string().into()],
        )
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn a_snapshot_sees_what_postgres_sees_in_it_and_prints_as_it_reads() {
        for text in ["100:110:102,105", "100:110:", "100:100:", "3:3:"] {
            let snapshot = Snapshot::parse(text).unwrap();
            assert_eq!(snapshot.to_string(), text);
            for xid in 0..=120_u64 {
                assert_eq!(
                    snapshot.sees(xid),
                    postgres_sees(xid, &snapshot),
                    "{text}: {xid}"
                );
            }
        }
        for malformed in ["", "1", "1:2", "a:2:", "1:2:x", "1:2:3,"] {
            assert_eq!(Snapshot::parse(malformed), None, "{malformed:?}");
        }
    }

    #[pg_test]
    fn a_snapshot_below_a_bound_sees_what_the_snapshot_saw_below_it_and_nothing_from_it() {
        let cases = [
            ("100:110:102,105", 104),
            ("100:110:102,105", 102),
            ("100:110:102,105", 90),
            ("100:110:102,105", 200),
            ("100:110:", 105),
            ("100:100:", 100),
        ];
        for (text, bound) in cases {
            let snapshot = Snapshot::parse(text).unwrap();
            let below = snapshot.below(bound);
            for xid in 80..=120_u64 {
                assert_eq!(
                    postgres_sees(xid, &below),
                    xid < bound && postgres_sees(xid, &snapshot),
                    "{text} below {bound} is {below}; xid {xid}"
                );
            }
        }
    }

    #[pg_test]
    fn a_union_sees_what_either_snapshot_sees_and_nothing_else() {
        let cases = [
            // A cut at a transaction running at the position (100), over xids it saw ended.
            ("100:151:100", "151:151:", 101, "151:151:"),
            ("100:151:100,120", "160:160:", 120, "120:151:120"),
            ("100:110:102,105", "103:115:104,112", 200, "112:115:112"),
            ("100:110:", "120:130:125", 200, "125:130:125"),
        ];
        for (position, new, bound, expected) in cases {
            let position = Snapshot::parse(position).unwrap();
            let sent = Snapshot::parse(new).unwrap().below(bound);
            let union = position.union(&sent);
            assert_eq!(union.to_string(), expected);
            for xid in 80..=170_u64 {
                assert_eq!(
                    postgres_sees(xid, &union),
                    postgres_sees(xid, &position) || postgres_sees(xid, &sent),
                    "{position} with {sent} is {union}; xid {xid}"
                );
            }
        }
    }
}
