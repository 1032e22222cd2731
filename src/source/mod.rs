//! Layer sources: what the image stack reads a layer's bytes from. A local file is opened by
//! the format crate ([`ovbd_format::FileSource`]); a remote layer reads a registry blob through
//! the block cache.
//!
//! - [`config`]: overlaybd's `config.v1.json`, and opening the [`ovbd_format::ImageStack`] it
//!   describes (local files, or remote lowers through a [`config::RemoteSource`]).
//! - [`remote`]: the registry as a [`config::RemoteSource`]: a remote lower is a
//!   [`cache::CachedBlob`] over a [`crate::registry::RemoteBlob`], wrapped in a
//!   [`remote::SwitchingBlob`] that turns to the downloaded file once there is one.
//! - [`download`]: the background download of a remote layer's whole blob (checked against
//!   its digest), and what its outcome changes in the cache and the layer.
//! - [`cache`]: the on-disk block cache (see its own files).

pub mod cache;
pub mod config;
pub mod download;
pub mod remote;
