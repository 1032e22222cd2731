//! ovbd: the OverlayBD snapshotter daemon. The modules follow the data path, one way:
//! `snapshotter` → `device` → image stack (`ovbd_format`) → `source` (file, cache, remote) →
//! `registry`. `cli` is the command line over all of them; `oci` and `convert` build images.

pub mod cli;
pub mod config;
pub mod convert;
pub mod device;
pub mod extfs;
pub mod mount;
pub mod oci;
pub mod registry;
pub mod snapshotter;
pub mod source;

#[doc(hidden)]
pub mod fuzzing;
