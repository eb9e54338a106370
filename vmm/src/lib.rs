//! The VMM (placeholder).
