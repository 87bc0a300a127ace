//! Integration tests: each one formats its own volume in a temporary directory and mounts it
//! for real with the `tidefs` binary (root is needed for allow_other and chown).

mod attrs;
mod cache;
mod cli;
mod crash;
mod data;
mod harness;
mod namespace;
mod shared;
mod space;
