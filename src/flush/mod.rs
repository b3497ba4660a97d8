//! TODO(owner): flush
