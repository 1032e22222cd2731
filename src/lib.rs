//! ovbd's library: the OverlayBD snapshotter, device, converter and lazy-pull machinery.
//! The `ovbd` binary (src/main.rs and its `*_tool` modules) is the command line over it; the
//! library is split out so the fuzz targets (fuzz/) can reach the parsers of untrusted input.

pub mod blob_cache;
pub mod config;
pub mod convert;
pub mod device;
pub mod extfs;
pub mod filters;
pub mod image_config;
pub mod image_io;
pub mod metadata;
pub mod mount;
pub mod registry;
pub mod remote_layer;
pub mod snapshotter;

#[doc(hidden)]
pub mod fuzzing;
