//! `ovbd convert` at the terminal: a progress bar per layer on a TTY, plain lines otherwise,
//! and the `--json` summary.

use crate::convert::{convert, ConvertOptions, LayerSummary, Progress};
use anyhow::Result;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub fn run(src: &str, dst: &str, opts: ConvertOptions, json: bool) -> Result<()> {
    let mut progress: Box<dyn Progress> = if std::io::stderr().is_terminal() {
        Box::new(Bars { bar: None })
    } else {
        Box::new(Lines)
    };
    let summary = convert(src, dst, &opts, &mut *progress)?;
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
