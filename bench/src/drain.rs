//! A listener that reads and discards every notification, as a relay's LISTEN connection would,
//! so the publish figures pay for waking a listener and the notification queue never grows.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures_util::StreamExt;
use pg_outbox_tests::Cluster;
use tokio::task::JoinHandle;
use tokio_postgres::{AsyncMessage, Client, NoTls};

pub struct Drain {
    client: Client,
    received: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

pub async fn spawn(cluster: &Cluster) -> Drain {
    spawn_in(cluster, "postgres").await
}

/// [`spawn`] in `database`: notifications are delivered within a database only.
pub async fn spawn_in(cluster: &Cluster, database: &str) -> Drain {
    let (client, mut connection) = cluster
        .config(database, "postgres")
        .connect(NoTls)
        .await
        .expect("connect the draining listener");
    let received = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&received);
    let task = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(_) = message {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    client
        .batch_execute("LISTEN pg_outbox")
        .await
        .expect("LISTEN pg_outbox");
    Drain {
        client,
        received,
        task,
    }
}

impl Drain {
    /// Closes the listener; returns how many notifications it read.
    pub async fn stop(self) -> u64 {
        drop(self.client);
        let _ = self.task.await;
        self.received.load(Ordering::Relaxed)
    }
}
