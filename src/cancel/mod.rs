//! TODO(owner): cancel
