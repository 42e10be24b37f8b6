//! One relay process of the soak test (see [`pg_outbox_tests::soak`]):
//! `soak-relay CONNECTION NAME EVENTS`.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [conn, name, events] = args.as_slice() else {
        eprintln!("usage: soak-relay CONNECTION NAME EVENTS");
        std::process::exit(2);
    };
    let Ok(events) = events.parse() else {
        eprintln!("soak-relay: EVENTS must be a number, not {events:?}");
        std::process::exit(2);
    };
    pg_outbox_tests::soak::relay_process(conn, name, events).await;
}
