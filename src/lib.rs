//! ovbd: the OverlayBD snapshotter daemon. The modules follow the data path, one way:
//! `snapshotter` → `device` → image stack (`ovbd_format`) → `source` (file, cache, remote) →
//! `registry`. `cli` is the command line over all of them; `oci` and `convert` build images.

pub mod cli;
pub(crate) mod config;
pub(crate) mod control;
pub(crate) mod convert;
pub(crate) mod cri_proxy;
pub(crate) mod device;
pub(crate) mod extfs;
pub(crate) mod labels;
pub(crate) mod metrics;
pub(crate) mod mount;
pub(crate) mod oci;
pub(crate) mod pool;
pub(crate) mod prefetch;
pub(crate) mod readahead;
pub(crate) mod registry;
pub(crate) mod snapshotter;
pub(crate) mod source;

#[cfg(test)]
mod testing;

#[doc(hidden)]
pub mod fuzzing;
