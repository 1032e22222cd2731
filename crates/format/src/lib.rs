//! The OverlayBD formats: LSMT layers, ZFile compression, the tar wrapper and image stacks.
//!
//! Pure data and I/O traits: layer bytes come in through [`source::ReadAt`], so a local file, a
//! cache or a registry blob are all the same to this crate.

pub mod commit;
pub mod crc;
pub mod error;
pub mod index;
pub mod layer;
pub mod lsmt;
pub mod rw;
pub mod source;
pub mod stack;
pub mod tar;
pub mod trace;
pub mod zfile;

pub use error::{Error, Result};
pub use index::SegmentIndex;
pub use layer::{open_layer, open_layer_file, OpenedLayer};
pub use lsmt::{LsmtFile, LsmtHeader, Segment};
pub use rw::{RwLayer, RwMode};
pub use source::{Blocking, FileSource, MemSource, ReadAt};
pub use stack::{Extent, ImageStack, LayerStack, ReadAdvisor};
pub use zfile::{Algorithm, ZFileOptions, ZFileReader};
