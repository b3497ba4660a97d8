//! # streamgate
//!
//! Tower layers, and a reverse proxy built from them, for streaming HTTP responses: LLM token streams
//! over Server-Sent Events, NDJSON and plain chunked bodies.
//!
//! Streaming broke the contracts the request path was built for. streamgate restores them:
//!
//! | layer | what it fixes |
//! |---|---|
//! | [`idle_timeout::IdleTimeoutLayer`] | load balancers cutting silent streams; hung upstreams. The idle deadline resets on every upstream frame; SSE comment heartbeats go out during silence, only where the SSE grammar allows. |
//! | [`flush::FlushLayer`] | tokens arriving in bursts: every upstream frame is flushed to the client on arrival, and downstream buffering is switched off. |
//! | [`cancel::CancelOnDisconnectLayer`] | leaked generation after the client leaves: a cancellation token fires and the upstream request is dropped at once. |
//! | [`trace::StreamTraceLayer`] | dashboards mixing time-to-first-byte with stream duration: one span to the first byte, one for the body. |
//!
//! ## Layer order
//!
//! ```text
//!            request ──►                                        ──► upstream / handler
//!  ┌────────────────────────────────────────────────────────────────────────────┐
//!  │ StreamTraceLayer        request span until first byte, stream span after    │
//!  │ ┌────────────────────────────────────────────────────────────────────────┐ │
//!  │ │ CancelOnDisconnectLayer  token in extensions; drop before end = cancel  │ │
//!  │ │ ┌────────────────────────────────────────────────────────────────────┐ │ │
//!  │ │ │ FlushLayer             one frame per flush, anti-buffering headers  │ │ │
//!  │ │ │ ┌────────────────────────────────────────────────────────────────┐ │ │ │
//!  │ │ │ │ IdleTimeoutLayer     first-byte + idle deadlines, keepalives     │ │ │ │
//!  │ │ │ │ ┌────────────────────────────────────────────────────────────┐ │ │ │ │
//!  │ │ │ │ │ your service (proxy forwarding, axum handler, ...)          │ │ │ │ │
//!  │ │ │ │ └────────────────────────────────────────────────────────────┘ │ │ │ │
//!  │ │ │ └────────────────────────────────────────────────────────────────┘ │ │ │
//!  │ │ └────────────────────────────────────────────────────────────────────┘ │ │
//!  │ └────────────────────────────────────────────────────────────────────────┘ │
//!  └────────────────────────────────────────────────────────────────────────────┘
//!            ◄── response                                       ◄── response
//! ```
//!
//! Tracing is outermost so its request span covers everything and its first byte is the byte hyper
//! writes. The idle timeout is innermost so its deadline sees upstream frames only, never injected
//! keepalives. The layers share one [`StreamInfo`] per request (in the request extensions) to agree on
//! how a stream ended and which bytes were injected.
//!
//! The layers' timers are tokio timers of the runtime they run on, which needs `enable_time`, unless
//! [`timers::spawn_thread`] has moved them to a thread of their own, as the proxy binary does.
//!
//! ## Non-goals
//!
//! streamgate does not transform payloads (no compression of event streams, no re-framing), does not
//! cache, and does not retry once a byte has reached the client.

#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod cancel;
pub mod flush;
pub mod idle_timeout;
pub mod mock;
pub mod proxy;
pub mod sse;
pub mod stream_info;
pub mod telemetry;
pub mod timers;
pub mod trace;

pub use stream_info::{EndReason, ErrorSource, StreamInfo};

/// The boxed error type used by streamgate's body wrappers and services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;
