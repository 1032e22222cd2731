//! What the device frontends report: attaching, stopping and deleting ublk devices, the FUSE
//! mount and its loop devices. The
//! answers to the kernel's requests are errnos, not these.

use libublk::UblkError;
use std::io;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A libublk control call failed (for a new device: is ublk_drv loaded?).
    #[error("{}: {what}: {}", device_name(*.id), ublk_text(.source))]
    Ublk {
        /// `None`: a device the kernel has not numbered yet.
        id: Option<u32>,
        what: &'static str,
        #[source]
        source: UblkError,
    },
    /// A thread of the device could not be started.
    #[error("spawning the {what} thread: {source}")]
    Spawn {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// The control thread ended without starting the device and without saying why.
    #[error("ublk control thread ended before the device started")]
    NotStarted,
    /// The control thread of device `id` panicked.
    #[error("ublk device {id}: its server thread panicked")]
    Panicked { id: u32 },
    /// The writable layer could not be made durable once the device stopped.
    #[error("{}: flushing the writable layer after detach: {source}", device_name(*.id))]
    Flush {
        id: Option<u32>,
        #[source]
        source: ovbd_format::Error,
    },
    /// The FUSE frontend's mount or session failed.
    #[error("fuse frontend: {what}: {source}")]
    Fuse {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// A loop device of the FUSE frontend could not be set up or detached.
    #[error("fuse frontend: {what}: {source}")]
    Loop {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    /// An option the chosen frontend does not have.
    #[error("the {frontend} frontend does not support {what}")]
    Unsupported {
        frontend: super::Frontend,
        what: &'static str,
    },
    /// Setting up the serving thread's private mount namespace failed.
    #[error("{what}: {source}")]
    Namespace {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn device_name(id: Option<u32>) -> String {
    match id {
        Some(id) => format!("ublk device {id}"),
        None => "ublk device".into(),
    }
}

/// libublk's message, with the errno its codes carry (its own text drops it).
fn ublk_text(e: &UblkError) -> String {
    match e {
        UblkError::OtherError(n) | UblkError::UringIOError(n) if *n != 0 => {
            format!("{e}: {}", io::Error::from_raw_os_error(n.abs()))
        }
        UblkError::IOError(io) => format!("{e}: {io}"),
        _ => e.to_string(),
    }
}
