//! Floodgate (being written).
#![deny(unsafe_code, unsafe_op_in_unsafe_fn)]
#![deny(missing_docs, missing_debug_implementations)]

pub mod cidr;
pub mod proxy_protocol;
pub mod rate_limit;
pub mod sni;
pub mod syn;
