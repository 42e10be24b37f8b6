//! Nothing is granted to PUBLIC; the README's grants are exactly enough for each role.

use pg_outbox_tests::Cluster;
use tokio_postgres::error::SqlState;

/// The grants the README tells operators to run.
const README_GRANTS: &str = "
    CREATE ROLE app_publisher LOGIN;
    GRANT EXECUTE ON FUNCTION outbox_publish(text, text, jsonb, text) TO app_publisher;
    GRANT INSERT ON event_outbox TO app_publisher;

    CREATE ROLE app_relay LOGIN;
    GRANT SELECT ON event_outbox, outbox_prune_state TO app_relay;

    CREATE ROLE outsider LOGIN;
";

#[tokio::test]
async fn ungranted_roles_are_refused_and_granted_ones_work() {
    let cluster = Cluster::start();
    let admin = cluster.connect("postgres").await;
    admin.batch_execute(README_GRANTS).await.unwrap();

    let outsider = cluster.connect_as("postgres", "outsider").await;
    for sql in [
        "SELECT outbox_publish('c', 'u', '{}')",
        "SELECT outbox_prune()",
        "SELECT * FROM outbox_stats()",
        "SELECT * FROM event_outbox",
        "INSERT INTO event_outbox (id, channel, user_id, payload) VALUES (gen_random_uuid(), 'c', 'u', '{}')",
    ] {
        let error = outsider.batch_execute(sql).await.unwrap_err();
        assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{sql}: {error}");
    }

    let publisher = cluster.connect_as("postgres", "app_publisher").await;
    let id: String = publisher
        .query_one(
            "SELECT outbox_publish('chat', 'u1', '{\"a\": 1}')::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    // Publishers write; they do not read other events.
    let error = publisher
        .batch_execute("SELECT * FROM event_outbox")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));

    let relay = cluster.connect_as("postgres", "app_relay").await;
    let found: i64 = relay
        .query_one(
            "SELECT count(*) FROM event_outbox WHERE id::text = $1",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, 1);
    relay
        .batch_execute("SELECT pruned_through_xid FROM outbox_prune_state")
        .await
        .unwrap();
    let error = relay
        .batch_execute("SELECT outbox_publish('c', 'u', '{}')")
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(&SqlState::INSUFFICIENT_PRIVILEGE));
}
