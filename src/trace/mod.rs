//! TODO(owner): trace
