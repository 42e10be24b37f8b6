//! `pg_outbox_wire`, the pgrx-free crate that holds what goes on the wire, checked against
//! PostgreSQL itself: its `pg_snapshot` against `pg_visible_in_snapshot`.

#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use pgrx::prelude::*;

    use pg_outbox_wire::Snapshot;

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
            let snapshot = text.parse::<Snapshot>().unwrap();
            assert_eq!(snapshot.to_string(), text);
            for xid in 0..=120_u64 {
                assert_eq!(
                    snapshot.is_visible(xid),
                    postgres_sees(xid, &snapshot),
                    "{text}: {xid}"
                );
            }
        }
        for malformed in ["", "1", "1:2", "a:2:", "1:2:x", "1:2:3,"] {
            assert!(malformed.parse::<Snapshot>().is_err(), "{malformed:?}");
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
            let snapshot = text.parse::<Snapshot>().unwrap();
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
            let position = position.parse::<Snapshot>().unwrap();
            let sent = new.parse::<Snapshot>().unwrap().below(bound);
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
