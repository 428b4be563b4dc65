//! benchmark support
