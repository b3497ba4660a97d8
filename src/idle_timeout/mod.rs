//! TODO(owner): idle_timeout
