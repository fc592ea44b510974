//! Benchmark peers and measurement helpers.
