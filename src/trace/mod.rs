//! Two-span tracing (being written on the `trace` branch).

/// Placeholder until the trace branch merges.
#[derive(Debug, Clone, Default)]
pub struct StreamMetrics;
