//! TODO(owner): proxy
