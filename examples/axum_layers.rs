//! An axum 0.8 Server-Sent Events app behind streamgate's three streaming layers.
//!
//! ```text
//! cargo run --example axum_layers                 # listens on 127.0.0.1:3000
//! curl -N http://127.0.0.1:3000/generate          # keepalives while "thinking", then tokens
//! ```
//!
//! Press Ctrl-C in curl mid-stream: the server prints that generation stopped. The handler hands the
//! request's `CancellationToken` to its generation task, which stops as soon as the client is gone
//! (not when the next token would have been written).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::response::sse::{Event, Sse};
use axum::routing::get;
use axum::{Extension, Router};
use futures_util::Stream;
use streamgate::cancel::CancelOnDisconnectLayer;
use streamgate::flush::FlushLayer;
use streamgate::idle_timeout::IdleTimeoutLayer;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tower::ServiceBuilder;

/// Stream 20 tokens after 3 s of "thinking". Generation runs in its own task, as a model server's
/// would, and stops when the client disconnects.
async fn generate(
    Extension(token): Extension<CancellationToken>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let (tx, rx) = mpsc::channel::<String>(4);
    tokio::spawn(async move {
        let work = async {
            tokio::time::sleep(Duration::from_secs(3)).await; // time to first token
            for n in 0..20 {
                if tx.send(format!("token {n}")).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        };
        tokio::select! {
            _ = token.cancelled() => println!("client went away: generation stopped"),
            _ = work => println!("generation complete"),
        }
    });
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        let token = rx.recv().await?;
        Some((Ok(Event::default().data(token)), rx))
    });
    // No axum `KeepAlive`: IdleTimeoutLayer injects keepalives, only at event-stream line boundaries.
    Sse::new(events)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned())
        .parse()
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;

    // Outer to inner, as in the streamgate proxy.
    let layers = ServiceBuilder::new()
        // .layer(streamgate::trace::StreamTraceLayer::new()) // outermost: spans to first byte and of the stream
        .layer(CancelOnDisconnectLayer::new())
        .layer(FlushLayer::new())
        .layer(
            IdleTimeoutLayer::new()
                .first_byte_timeout(Some(Duration::from_secs(30)))
                .idle_timeout(Duration::from_secs(60))
                .keepalive_interval(Some(Duration::from_secs(1))),
        );

    let app = Router::new()
        .route("/generate", get(generate))
        .layer(layers);

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!(
        "listening on http://{}; try: curl -N http://{}/generate",
        listener.local_addr()?,
        listener.local_addr()?
    );
    axum::serve(listener, app).await
}
