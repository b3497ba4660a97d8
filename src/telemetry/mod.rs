//! Telemetry (placeholder while building).
