//! The streamgate reverse proxy: configuration, upstream pools, forwarding, and the server.
//!
//! The proxy is the library's layers composed in front of a forwarding service; [`stack`] is the one
//! place that order is written. Use [`Config::load`] (or [`Config::from_toml`]) and [`Server::bind`],
//! then [`Server::run`] with a shutdown future:
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use streamgate::proxy::{Config, Overrides, Server};
//! let cfg = Config::load(None, &Overrides {
//!     listen: Some("127.0.0.1:8080".into()),
//!     upstreams: vec!["http://127.0.0.1:9000".into()],
//!     ..Overrides::default()
//! })?;
//! let server = Server::bind(cfg).await?;
//! server.run(async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(()) }
//! ```

mod body;
pub mod config;
mod downstream;
mod drain;
mod error;
mod forward;
mod h1;
mod headers;
mod http1;
mod idle;
mod pool;
mod server;
pub mod stack;
mod stream_timeout;
#[cfg(test)]
mod test_waker;
mod tls;

pub use body::{ProxyBody, ShutdownError};
pub use config::{Config, ConfigError, Overrides};
pub use error::{json_error, ProxyError, ProxyErrorKind};
pub use forward::ConnInfo;
pub use server::{ServeError, Server, ServerOptions};
