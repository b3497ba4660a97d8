//! The one place the proxy's service stack is assembled: reading it shows the order of the onion.
//!
//! ```text
//! per connection:  WithConnInfo            client address, TLS flag into request extensions
//! per request:     StreamTraceLayer        request span to first byte, stream span, metrics, access log
//!                  Router                  host + longest path prefix -> route
//! per route:       CancelOnDisconnectLayer client gone -> token cancelled, upstream dropped
//!                  FlushLayer              one frame per flush, anti-buffering headers
//!                  IdleTimeoutLayer        first-byte timeout (504), idle timeout, SSE keepalives
//!                  Forward                 endpoint choice, header hygiene, failover, streamed body
//! ```

use std::task::{Context, Poll};

use http::Request;

use bytes::Bytes;
use tower::ServiceBuilder;

use super::body::ClientBody;
use super::config::{RouteConfig, StreamSettings};
use super::forward::{ConnInfo, Forward};
use super::server::{Router, ServerOptions};
use crate::cancel::{CancelOnDisconnect, CancelOnDisconnectLayer};
use crate::flush::{Flush, FlushLayer};
use crate::idle_timeout::{IdleTimeout, IdleTimeoutLayer};
use crate::trace::{ClientAddr, StreamTrace, StreamTraceLayer};

/// The stack of one route.
pub(crate) type RouteStack = CancelOnDisconnect<Flush<IdleTimeout<Forward>>>;

/// The whole application, above the per-connection wrapper.
pub(crate) type App = StreamTrace<Router>;

/// Build one route's stack from its stream settings.
pub(crate) fn route_stack(forward: Forward, s: &StreamSettings) -> RouteStack {
    let ndjson = s
        .ndjson_keepalive
        .as_ref()
        .map(|l| Bytes::from(format!("{l}\n")));
    ServiceBuilder::new()
        .layer(CancelOnDisconnectLayer::new())
        .layer(FlushLayer::new())
        .layer(
            IdleTimeoutLayer::new()
                .idle_timeout(s.idle_timeout)
                .first_byte_timeout(Some(s.first_byte_timeout))
                .keepalive_interval(s.keepalive_interval)
                .ndjson_keepalive(ndjson),
        )
        .service(forward)
}

/// Wrap the router in the request-level layers.
pub(crate) fn app(router: Router, opts: &ServerOptions) -> App {
    let mut trace = StreamTraceLayer::new();
    if let Some(m) = &opts.metrics {
        trace = trace.metrics(m.clone());
    }
    ServiceBuilder::new().layer(trace).service(router)
}

/// Called with the matched route inside the request span.
pub(crate) fn on_route(route: &RouteConfig) {
    crate::trace::record_route(&route.path_prefix);
}

/// Per-connection wrapper: puts the connection facts into every request's extensions.
#[derive(Clone, Debug)]
pub(crate) struct WithConnInfo {
    inner: App,
    info: ConnInfo,
}

pub(crate) fn with_conn_info(inner: App, info: ConnInfo) -> WithConnInfo {
    WithConnInfo { inner, info }
}

impl tower::Service<Request<ClientBody>> for WithConnInfo {
    type Response = <App as tower::Service<Request<ClientBody>>>::Response;
    type Error = <App as tower::Service<Request<ClientBody>>>::Error;
    type Future = <App as tower::Service<Request<ClientBody>>>::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<ClientBody>) -> Self::Future {
        req.extensions_mut().insert(self.info);
        req.extensions_mut().insert(ClientAddr(self.info.remote));
        self.inner.call(req)
    }
}
