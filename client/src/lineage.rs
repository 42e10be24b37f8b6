//! The server's history as the relay knows it: the run it is on, the runs the database recorded
//! and those the relay went through (so positions issued on them are carried over), and how
//! many times it rewound. Pure: the listener tells it what each connection reached, what the
//! database recorded and where the old history was proved to hold, and asks it for watermarks
//! and for what a resume is answered against.

use pg_outbox_wire::Snapshot;

use crate::history::{self, Floor, RecordedRun, ServerRun};
use crate::policy::Policy;
use crate::position::{RunChange, Watermark};
use crate::resume::Answering;

/// At most this many changes of server run are remembered for carrying positions over.
const RUN_CHANGES_KEPT: usize = 16;

#[derive(Debug)]
pub(crate) struct Lineage {
    /// The server run whose history the cursor follows.
    server: ServerRun,
    /// An advance saw the server's transaction ids go back: check the history at the next
    /// connection, even if the server's run looks the same.
    went_back: bool,
    /// The server runs the database recorded, oldest first, as read when the relay reached
    /// the current one (none from an extension before 0.6.0).
    recorded: Vec<RecordedRun>,
    /// The server runs the relay went through before this one, oldest first.
    changes: Vec<RunChange>,
    /// The change into the current run, when the relay proved where the old history holds:
    /// its subscriptions' positions are carried over.
    carried_from: Option<RunChange>,
    /// How many times the relay rewound (see [`Watermark::generation`]).
    generation: u64,
}

impl Lineage {
    pub fn new(server: ServerRun, recorded: Vec<RecordedRun>) -> Lineage {
        Lineage {
            server,
            went_back: false,
            recorded,
            changes: Vec::new(),
            carried_from: None,
            generation: 0,
        }
    }

    pub fn server(&self) -> &ServerRun {
        &self.server
    }

    /// The runs the database recorded, read on the current run.
    pub fn recorded(&mut self, runs: Vec<RecordedRun>) {
        self.recorded = runs;
    }

    /// Where the history the relay read holds on `run`, by the database's record: below the
    /// floor of the first run recorded after the relay's.
    pub fn recorded_floor(&self, run: &ServerRun) -> Option<u64> {
        history::floor_after(&self.recorded, self.server.epoch(), run.epoch())
    }

    /// Transaction ids went back on what looked like the same server.
    pub fn went_back(&mut self) {
        self.went_back = true;
    }

    /// Whether a connection that reached `run` must check which history it holds before
    /// reading on.
    pub fn needs_check(&self, run: &ServerRun) -> bool {
        *run != self.server || self.went_back
    }

    /// The relay moved to `run`, rewinding to `floor`: exact, its positions are carried over
    /// below it; assumed, no position of an earlier run can be carried over from here on.
    pub fn moved_to(&mut self, run: ServerRun, floor: Floor) {
        match floor {
            Floor::Exact(xid) => {
                let change = RunChange {
                    from: self.server.epoch(),
                    floor: xid,
                };
                self.carried_from = Some(change);
                self.changes.push(change);
                if self.changes.len() > RUN_CHANGES_KEPT {
                    self.changes.remove(0);
                }
            }
            Floor::Assumed(_) => {
                self.carried_from = None;
                self.changes.clear();
            }
        }
        self.generation += 1;
        self.server = run;
        self.went_back = false;
    }

    /// A watermark at `snapshot` on the current run.
    pub fn watermark(&self, snapshot: Snapshot) -> Watermark {
        Watermark {
            change: self.carried_from,
            generation: self.generation,
            ..Watermark::new(self.server.epoch(), snapshot)
        }
    }

    /// What resume requests are answered against now, under `policy`.
    pub fn answering<'a>(&'a self, policy: &'a Policy) -> Answering<'a> {
        Answering {
            epoch: self.server.epoch(),
            generation: self.generation,
            recorded: &self.recorded,
            changes: &self.changes,
            policy,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    fn run(started: u64) -> ServerRun {
        ServerRun {
            system_identifier: "7300000000000000001".into(),
            timeline: "1".into(),
            started_at: SystemTime::UNIX_EPOCH + Duration::from_secs(started),
        }
    }

    #[test]
    fn changes_are_carried_while_exact_and_forgotten_once_assumed() {
        let mut lineage = Lineage::new(run(1), Vec::new());
        assert!(!lineage.needs_check(&run(1)) && lineage.needs_check(&run(2)));
        lineage.went_back();
        assert!(lineage.needs_check(&run(1)));

        let first = run(1).epoch();
        lineage.moved_to(run(2), Floor::Exact(150));
        assert!(!lineage.needs_check(&run(2)), "checked");
        let watermark = lineage.watermark("160:160:".parse().unwrap());
        assert_eq!(watermark.epoch, run(2).epoch());
        assert_eq!(watermark.generation, 1);
        assert_eq!(
            watermark.change,
            Some(RunChange {
                from: first,
                floor: 150
            })
        );
        let policy = Policy::default();
        assert_eq!(lineage.answering(&policy).changes.len(), 1);

        lineage.moved_to(run(3), Floor::Assumed(170));
        let watermark = lineage.watermark("180:180:".parse().unwrap());
        assert_eq!((watermark.change, watermark.generation), (None, 2));
        assert!(lineage.answering(&policy).changes.is_empty());
    }

    #[test]
    fn only_the_latest_changes_are_kept() {
        let mut lineage = Lineage::new(run(0), Vec::new());
        for n in 1..=(RUN_CHANGES_KEPT as u64 + 4) {
            lineage.moved_to(run(n), Floor::Exact(n * 10));
        }
        let policy = Policy::default();
        let answering = lineage.answering(&policy);
        assert_eq!(answering.changes.len(), RUN_CHANGES_KEPT);
        assert_eq!(answering.changes[0].from, run(4).epoch());
    }
}
