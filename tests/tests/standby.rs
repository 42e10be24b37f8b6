//! A standby refuses to publish, with an error that says where to publish instead.

use pg_outbox_tests::Cluster;
use tokio_postgres::error::SqlState;

#[tokio::test]
async fn publishing_on_a_standby_is_refused_with_25006() {
    let primary = Cluster::start();
    let standby = primary.standby();
    let client = standby.connect("postgres").await;
    let in_recovery: bool = client
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery);

    let error = client
        .batch_execute("SELECT outbox_publish('c', 'u', '{}')")
        .await
        .unwrap_err();
    let db_error = error.as_db_error().expect("a server error");
    assert_eq!(db_error.code(), &SqlState::READ_ONLY_SQL_TRANSACTION);
    assert!(db_error.message().contains("standby"), "{db_error}");
    assert_eq!(
        db_error.hint(),
        Some("Connect publishers to the primary server.")
    );
}
