//! Shared helpers for the loopback integration tests.
