//! Layer sources: what the image stack reads a layer's bytes from. A local file is opened by
//! the format crate; a remote layer reads a registry blob through the block cache.

pub mod cache;
pub mod config;
pub mod remote;
