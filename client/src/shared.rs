//! What a relay's handle and its listener task share.

use tokio::sync::{mpsc, watch};

use crate::fanout::Fanout;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::resume::ResumeRequest;

pub(crate) struct Shared {
    pub fanout: Fanout,
    pub metrics: Metrics,
    pub health: watch::Sender<Health>,
    /// Subscriptions asking to resume from a position.
    pub resumes: mpsc::UnboundedSender<ResumeRequest>,
}
