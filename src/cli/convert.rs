//! `ovbd convert` at the terminal: a progress bar per layer on a TTY, plain lines otherwise,
//! and the `--json` summary.

use crate::convert::{convert, ConvertOptions, LayerSummary, Progress};
use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the signal thread before it removes the scratch directory: from then on the
/// conversion's own I/O errors are a consequence of the interrupt, not something to report.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

pub fn run(src: &str, dst: &str, mut opts: ConvertOptions, json: bool) -> Result<()> {
    // The scratch directory is ours, so an interrupt (Ctrl-C, SIGTERM, SIGHUP) can remove it:
    // the destination itself never holds a partial image (its manifest / index goes last).
    let scratch = crate::convert::scratch_dir(opts.workdir.as_deref(), "ovbd-convert-")?;
    remove_on_interrupt(scratch.path().to_owned())?;
    opts.workdir = Some(scratch.path().to_owned());

    let mut progress: Box<dyn Progress> = if std::io::stderr().is_terminal() {
        Box::new(Bars { bar: None })
    } else {
        Box::new(Lines)
    };
    let summary = convert(src, dst, &opts, &mut *progress);
    if INTERRUPTED.load(Ordering::SeqCst) {
        // The signal thread is removing the scratch and will exit 130; returning here would
        // race it with exit 1 (or 0) and an error about files it just removed.
        loop {
            std::thread::park();
        }
    }
    let summary = summary?;
    if json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        eprintln!(
            "converted {src} -> {dst}: manifest {} ({} layers, {:.1} s)",
            summary.manifest,
            summary.layers.len(),
            summary.seconds
        );
    }
    Ok(())
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    hex.get(..12).unwrap_or(hex)
}

fn done_line(s: &LayerSummary) -> String {
    format!(
        "{} -> {} ({} bytes, {} entries) in {:.1} s",
        short(&s.source_digest),
        s.digest,
        s.size,
        s.entries,
        s.seconds
    )
}

struct Lines;

impl Progress for Lines {
    fn layer_start(&mut self, index: usize, count: usize, digest: &str, size: u64) {
        eprintln!("layer {}/{count}: {digest} ({size} bytes)", index + 1);
    }
    fn layer_bytes(&mut self, _read: u64) {}
    fn layer_done(&mut self, s: &LayerSummary) {
        eprintln!("  {}", done_line(s));
    }
}

struct Bars {
    bar: Option<ProgressBar>,
}

impl Progress for Bars {
    fn layer_start(&mut self, index: usize, count: usize, digest: &str, size: u64) {
        let bar = ProgressBar::new(size);
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(format!("layer {}/{count} {}", index + 1, short(digest)));
        self.bar = Some(bar);
    }
    fn layer_bytes(&mut self, read: u64) {
        if let Some(b) = &self.bar {
            b.set_position(read);
        }
    }
    fn layer_done(&mut self, s: &LayerSummary) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        eprintln!("{}", done_line(s));
    }
}

/// Blocks SIGINT, SIGTERM and SIGHUP in this thread (and so in every thread started after it)
/// and starts one thread that waits for them, removes `dir` and exits 130 like a shell would.
fn remove_on_interrupt(dir: PathBuf) -> Result<()> {
    let set = super::block_stop_signals()?;
    std::thread::Builder::new()
        .name("convert-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid signal set; sigwait writes the signal number to `sig`.
            if unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!(
                    "ovbd convert: interrupted (signal {sig}); removing {}",
                    dir.display()
                );
                // The conversion keeps running until it trips over the removal, and may create
                // a file in a directory being removed: try again until the directory is gone.
                for _ in 0..20 {
                    match std::fs::remove_dir_all(&dir) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            std::thread::sleep(std::time::Duration::from_millis(10))
                        }
                        _ => break,
                    }
                }
                std::process::exit(130);
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}
