//! With the client's `tls` feature, a relay connects over TLS to a server with `ssl = on`,
//! verifies its certificate against the CA it was given, and refuses a certificate it cannot
//! verify.

use std::collections::HashSet;

use pg_outbox_client::{Error, RelayBuilder, Topic};
use pg_outbox_tests::relay::{publish, Collector};
use pg_outbox_tests::Cluster;

fn tls_relay(cluster: &Cluster, name: &str, ca_pem: &[u8]) -> Result<RelayBuilder, Error> {
    RelayBuilder::from_connection_string(&format!(
        "{}?sslmode=require&application_name={name}",
        cluster.url("postgres")
    ))?
    .tls_root_certificates_pem(ca_pem)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_connects_over_verified_tls() {
    let cluster = Cluster::builder().tls(true).start();
    let ca = std::fs::read(cluster.ca_certificate()).expect("read the test CA");
    let client = cluster.connect("postgres").await;

    let relay = tls_relay(&cluster, "relay_tls", &ca)
        .expect("the CA parses")
        .build()
        .unwrap();
    let all = Collector::spawn(relay.subscribe_to(Topic::all()));
    relay.start().await.expect("the relay starts over TLS");

    let encrypted = cluster.psql(
        "postgres",
        "SELECT bool_and(s.ssl) AND count(*) > 0 FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'relay_tls'",
    );
    assert_eq!(encrypted, "t", "the relay's connection is encrypted");

    let id = publish(&client, "chat", "u1", r#"{"secret":true}"#, None).await;
    all.wait_for_all(&cluster, "the event over TLS", &HashSet::from([id]))
        .await;
    relay.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unverifiable_certificate_or_a_plaintext_relay_is_refused() {
    let cluster = Cluster::builder().tls(true).start();

    // The server's own certificate is no CA: its issuer is unknown, the handshake fails.
    let not_a_ca = std::fs::read(cluster.ca_certificate().with_file_name("server.crt"))
        .expect("read the server certificate");
    let relay = tls_relay(&cluster, "relay_tls_bad_ca", &not_a_ca)
        .unwrap()
        .build()
        .unwrap();
    let err = relay
        .start()
        .await
        .expect_err("an unverified server is refused");
    assert!(err.is_connect(), "{err}");

    // Without the tls feature's connector, sslmode=require cannot be met.
    let plain = RelayBuilder::from_connection_string(&format!(
        "{}?sslmode=require",
        cluster.url("postgres")
    ))
    .unwrap()
    .build()
    .unwrap();
    let err = plain
        .start()
        .await
        .expect_err("sslmode=require without TLS");
    assert!(err.is_connect(), "{err}");

    assert!(tls_relay(&cluster, "x", b"not a certificate").is_err_and(|err| err.is_config()));
}
