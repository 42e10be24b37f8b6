//! The relay's builder, its documented defaults, and the settings a built relay runs with.

use std::time::Duration;

use crate::error::{Error, Kind};
use crate::policy::Policy;
use crate::tls::Tls;

/// Default `application_name` of the relay's connection (visible in `pg_stat_activity`).
pub const DEFAULT_APPLICATION_NAME: &str = "pg_outbox_relay";

/// Configures a [`Relay`](crate::Relay). Every setting has a default; only the connection is required.
#[derive(Clone, Debug)]
pub struct RelayBuilder {
    pg: tokio_postgres::Config,
    instance_id: Option<String>,
    channels: Vec<String>,
    subscriber_buffer: usize,
    backoff_min: Duration,
    backoff_max: Duration,
    deliver_own_origin: bool,
    sweep_interval: Duration,
    fetch_interval: Duration,
    schema: String,
    application_name: Option<String>,
    connect_timeout: Duration,
    query_timeout: Duration,
    verify_listen: bool,
    tls: Tls,
    prune_every: Option<Duration>,
}

/// What a built relay runs with: the builder's settings, checked, with the rules of which
/// events it passes on folded into its [`Policy`]. Shared, never changed, by the relay's handle
/// and its task.
#[derive(Debug)]
pub(crate) struct Settings {
    pub pg: tokio_postgres::Config,
    pub policy: Policy,
    pub subscriber_buffer: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub sweep_interval: Duration,
    pub fetch_interval: Duration,
    pub schema: String,
    pub connect_timeout: Duration,
    pub query_timeout: Duration,
    pub verify_listen: bool,
    pub tls: Tls,
    pub prune_every: Option<Duration>,
}

impl RelayBuilder {
    /// A builder for a relay on this connection configuration.
    pub fn new(pg: tokio_postgres::Config) -> RelayBuilder {
        RelayBuilder {
            pg,
            instance_id: None,
            channels: Vec::new(),
            subscriber_buffer: 1024,
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            deliver_own_origin: false,
            sweep_interval: Duration::from_secs(2),
            fetch_interval: Duration::from_millis(25),
            schema: "public".to_owned(),
            application_name: None,
            connect_timeout: Duration::from_secs(10),
            query_timeout: Duration::from_secs(30),
            verify_listen: true,
            tls: Tls::Plain,
            prune_every: None,
        }
    }

    /// Prunes expired events every `interval` (with some jitter), for a database where nothing
    /// else does: the SQL edition with no `pg_cron` job, or the native one without its worker.
    /// Every relay may opt in: one at a time prunes, elected by an advisory lock that ends with
    /// its session (a relay killed mid-prune hands over at once). It calls `outbox_prune()`,
    /// which removes what is older than `pg_outbox.retention` by the database clock (expired
    /// segments whole, other rows in batches), without holding publishers up; the relay's role
    /// needs `EXECUTE` on it. Counted
    /// in [`MetricsSnapshot::prunes`](crate::MetricsSnapshot::prunes); in the SQL edition,
    /// `outbox_stats()` says who pruned last. Default: off.
    pub fn prune_every(mut self, interval: Duration) -> Self {
        self.prune_every = Some(interval);
        self
    }

    /// A builder from a libpq-style connection string or URL
    /// (`host=… dbname=…` or `postgresql://…`).
    pub fn from_connection_string(s: &str) -> Result<RelayBuilder, Error> {
        s.parse()
            .map(RelayBuilder::new)
            .map_err(|e| Error::from(Kind::ConnectionString(e)))
    }

    /// This replica's instance id. Events published with this origin
    /// (`outbox_publish(…, origin)`) are not delivered by this relay unless
    /// [`deliver_own_origin`](Self::deliver_own_origin) is set. Default: none (deliver everything).
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Only relay these channels (the catch-up query filters on them too). Default: every channel.
    pub fn channels<I, S>(mut self, channels: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.channels = channels.into_iter().map(Into::into).collect();
        self
    }

    /// How many events each subscriber may have queued, besides the batch it is reading, before
    /// the relay stops queueing for it and it reads what it missed from the outbox instead
    /// (see [`Subscription`](crate::Subscription)). Default: 1024.
    pub fn subscriber_buffer(mut self, events: usize) -> Self {
        self.subscriber_buffer = events;
        self
    }

    /// Reconnect backoff bounds: the first retry waits about `min`, each next one twice as long
    /// up to `max`, each with jitter (a random half of the delay). Default: 1 s to 60 s.
    pub fn backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff_min = min;
        self.backoff_max = max;
        self
    }

    /// Deliver events whose origin is this relay's instance id too. Default: false.
    pub fn deliver_own_origin(mut self, deliver: bool) -> Self {
        self.deliver_own_origin = deliver;
        self
    }

    /// How long the relay may stay idle before it runs an advance anyway: it settles its cursor,
    /// delivers rows whose notification was lost, and proves the connection alive. Default: 2 s.
    /// A busy relay sweeps sooner, after every 2,000 events delivered since the last advance,
    /// so that each sweep stays small.
    pub fn sweep_interval(mut self, interval: Duration) -> Self {
        self.sweep_interval = interval;
        self
    }

    /// The shortest time between two queries that fetch referenced rows, unless 32 notified
    /// rows already wait. The first reference after a quiet spell is fetched at once;
    /// references arriving within this interval of the last fetch wait for the next one and
    /// share it, and once 32 rows wait the fetch starts without waiting for the interval. So
    /// a relay runs at most one fetch per interval at low rates, one per 32 events at high
    /// rates, and never one per notification (queries per event and latency at each rate:
    /// BENCHMARKS.md). It bounds the latency a fetch adds. Default: 25 ms.
    pub fn fetch_interval(mut self, interval: Duration) -> Self {
        self.fetch_interval = interval;
        self
    }

    /// The schema the extension was created in. Default: `public`.
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The connection's `application_name`. Default: the connection configuration's, else
    /// `pg_outbox_relay`.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.application_name = Some(name.into());
        self
    }

    /// Limit on connecting (and on the start-up checks). Default: 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Limit on one advance query; past it the connection is presumed dead and replaced.
    /// Default: 30 s.
    pub fn query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// Whether `start()` proves LISTEN works by sending itself a notification from a second,
    /// short-lived connection (detects a pooler in transaction mode). Default: true.
    pub fn verify_listen(mut self, verify: bool) -> Self {
        self.verify_listen = verify;
        self
    }

    /// Connects with TLS through rustls configured by `config` (its roots decide which server
    /// certificates are trusted, and the host name is checked against the certificate).
    /// Whether TLS is required follows the connection string's `sslmode`: `prefer` (the
    /// default) uses TLS when the server offers it, `require` refuses a server without it,
    /// `disable` never uses it. Unix-socket connections never use TLS. Default: no TLS.
    ///
    /// Needs the crate feature `tls`; [`rustls`](crate::rustls) is re-exported so the versions
    /// match.
    #[cfg(feature = "tls")]
    pub fn tls(mut self, config: rustls::ClientConfig) -> Self {
        self.tls = Tls::Rustls(tokio_postgres_rustls::MakeRustlsConnect::new(config));
        self
    }

    /// Connects with TLS, trusting only the CA certificates in `pem` (the text of a PEM file,
    /// such as libpq's `sslrootcert`), with rustls's `ring` provider. See [`tls`](Self::tls)
    /// for `sslmode`.
    ///
    /// ```no_run
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let pem = std::fs::read("/etc/ssl/pg-root.crt")?;
    /// let relay = pg_outbox_client::RelayBuilder::from_connection_string(
    ///     "host=db.internal dbname=app user=relay sslmode=require",
    /// )?
    /// .tls_root_certificates_pem(&pem)?
    /// .build()?;
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "tls")]
    pub fn tls_root_certificates_pem(self, pem: &[u8]) -> Result<Self, Error> {
        let config = crate::tls::config_from_pem(pem).map_err(|e| Error::from(Kind::Tls(e)))?;
        Ok(self.tls(config))
    }

    /// Checks the settings, and fills in the connection's defaults.
    pub(crate) fn settings(mut self) -> Result<Settings, Error> {
        if self.subscriber_buffer == 0 {
            return Err(Error::from(Kind::InvalidConfig(
                "subscriber_buffer must be at least 1",
            )));
        }
        if self.backoff_min.is_zero() || self.backoff_min > self.backoff_max {
            return Err(Error::from(Kind::InvalidConfig(
                "backoff bounds must satisfy 0 < min <= max",
            )));
        }
        if self.sweep_interval.is_zero() {
            return Err(Error::from(Kind::InvalidConfig(
                "sweep_interval must be above zero",
            )));
        }
        if self.connect_timeout.is_zero() || self.query_timeout.is_zero() {
            return Err(Error::from(Kind::InvalidConfig(
                "timeouts must be above zero",
            )));
        }
        if self.schema.is_empty() {
            return Err(Error::from(Kind::InvalidConfig("schema must not be empty")));
        }
        if self
            .prune_every
            .is_some_and(|every| every < Duration::from_millis(100))
        {
            return Err(Error::from(Kind::InvalidConfig(
                "prune_every must be at least 100 ms",
            )));
        }
        if self.instance_id.as_deref() == Some("") {
            return Err(Error::from(Kind::InvalidConfig(
                "instance_id must not be empty",
            )));
        }
        match self.application_name.take() {
            Some(name) => {
                self.pg.application_name(&name);
            }
            None if self.pg.get_application_name().is_none() => {
                self.pg.application_name(DEFAULT_APPLICATION_NAME);
            }
            None => {}
        }
        if self.pg.get_connect_timeout().is_none() {
            self.pg.connect_timeout(self.connect_timeout);
        }
        Ok(Settings {
            pg: self.pg,
            policy: Policy::new(self.channels, self.instance_id, self.deliver_own_origin),
            subscriber_buffer: self.subscriber_buffer,
            backoff_min: self.backoff_min,
            backoff_max: self.backoff_max,
            sweep_interval: self.sweep_interval,
            fetch_interval: self.fetch_interval,
            schema: self.schema,
            connect_timeout: self.connect_timeout,
            query_timeout: self.query_timeout,
            verify_listen: self.verify_listen,
            tls: self.tls,
            prune_every: self.prune_every,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_checks_settings() {
        let b = || RelayBuilder::from_connection_string("host=/tmp dbname=x").unwrap();
        assert!(b().subscriber_buffer(0).settings().is_err());
        assert!(b()
            .backoff(Duration::from_secs(2), Duration::from_secs(1))
            .settings()
            .is_err());
        assert!(b().schema("").settings().is_err());
        assert!(b().instance_id("").settings().is_err());
        assert!(RelayBuilder::from_connection_string("port=notaport").is_err());
    }

    #[test]
    fn application_name_defaults_but_respects_the_connection_string() {
        let name = |builder: RelayBuilder| {
            let settings = builder.settings().unwrap();
            settings.pg.get_application_name().map(str::to_owned)
        };
        assert_eq!(name(b("host=/tmp")).as_deref(), Some("pg_outbox_relay"));
        let mine = b("host=/tmp application_name=mine");
        assert_eq!(name(mine).as_deref(), Some("mine"));
        let forced = b("host=/tmp application_name=mine").application_name("forced");
        assert_eq!(name(forced).as_deref(), Some("forced"));
    }

    fn b(s: &str) -> RelayBuilder {
        RelayBuilder::from_connection_string(s).unwrap()
    }
}
