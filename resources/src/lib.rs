//! Guest and test-host images (placeholder).
