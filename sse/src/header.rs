//! The `Last-Event-ID` request header, as an axum extractor.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::HeaderMap;

/// The `Last-Event-ID` header `EventSource` sends when it reconnects: the `id:` of the last
/// frame the browser received whole, so here a position to resume from. `None` on a first
/// connection (and for an empty header, which `EventSource` never sends).
///
/// Never rejects a request: a value that is not a position (not ASCII, damaged, forged) is
/// passed on as it is, and the stream answers it with `event: reset` (reason `malformed`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LastEventId(pub Option<String>);

impl LastEventId {
    /// The header's value in `headers`, trimmed; `None` when absent or empty.
    pub fn from_headers(headers: &HeaderMap) -> LastEventId {
        let value = headers
            .get("last-event-id")
            .map(|value| String::from_utf8_lossy(value.as_bytes()).trim().to_owned());
        LastEventId(value.filter(|value| !value.is_empty()))
    }

    /// The value, for [`stream`](crate::stream).
    pub fn as_deref(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for LastEventId {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(LastEventId::from_headers(&parts.headers))
    }
}

#[cfg(test)]
mod tests {
    use axum::http::{HeaderValue, Request};

    use super::*;

    async fn extract(value: Option<HeaderValue>) -> LastEventId {
        let mut request = Request::builder().uri("/events");
        if let Some(value) = value {
            request = request.header("Last-Event-ID", value);
        }
        let (mut parts, ()) = request.body(()).unwrap().into_parts();
        match LastEventId::from_request_parts(&mut parts, &()).await {
            Ok(id) => id,
            Err(never) => match never {},
        }
    }

    #[tokio::test]
    async fn reads_the_header_through_the_extractor() {
        assert_eq!(extract(None).await, LastEventId(None));
        assert_eq!(
            extract(Some(HeaderValue::from_static("AQID_-x"))).await,
            LastEventId(Some("AQID_-x".into()))
        );
        assert_eq!(
            extract(Some(HeaderValue::from_static("  AQID  "))).await,
            LastEventId(Some("AQID".into()))
        );
        assert_eq!(extract(Some(HeaderValue::from_static(""))).await.0, None);
        assert_eq!(extract(Some(HeaderValue::from_static("   "))).await.0, None);
    }

    #[tokio::test]
    async fn a_value_that_is_not_ascii_is_passed_on_to_be_reset() {
        let value = HeaderValue::from_bytes(b"caf\xc3\xa9 \xff").unwrap();
        let id = extract(Some(value)).await;
        assert_eq!(id.as_deref(), Some("café \u{fffd}"));
        assert!(id
            .as_deref()
            .unwrap()
            .parse::<pg_outbox_client::Position>()
            .is_err());
    }
}
