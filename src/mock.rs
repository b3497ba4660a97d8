//! TODO(owner): mock
