//! The `ovbd layer` and `ovbd image export` verbs.

use anyhow::{bail, Context, Result};
use ovbd_format::commit::{commit_compact, CommitInfo};
use ovbd_format::layer::{open_layer_file, unwrap, write_blob, BlobOptions};
use ovbd_format::lsmt::{parse_uuid, LsmtFile, NIL_UUID};
use ovbd_format::source::FileSource;
use ovbd_format::zfile::ZFileOptions;
use ovbd_format::{LayerStack, ReadAt, RwLayer, RwMode};
use serde_json::json;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub fn inspect(path: &Path, as_json: bool) -> Result<()> {
    let layer = open_layer_file(path)?;
    // Read every block so CRCs and decompression are checked, not just the headers.
    let mut blocks_checked = 0u64;
    if let Some(z) = &layer.zfile {
        let bs = z.info.block_size as usize;
        let mut buf = vec![0u8; bs * 16];
        let mut pos = 0u64;
        while pos < z.size() {
            let n = (z.size() - pos).min(buf.len() as u64) as usize;
            ovbd_format::source::read_exact_at(&**z, &mut buf[..n], pos)?;
            pos += n as u64;
        }
        blocks_checked = z.block_count();
    }
    let l = &layer.lsmt;
    let zeroed = l.segments.iter().filter(|s| s.zeroed).count() as u64;
    let valid = l.segments.len() as u64;
    let data_sectors: u64 = l
        .segments
        .iter()
        .filter(|s| !s.zeroed)
        .map(|s| s.length as u64)
        .sum();
    let zinfo = layer.zfile.as_ref().map(|z| {
        let h = &z.info;
        json!({
            "algorithm": z.algorithm().name(),
            "block_size": h.block_size,
            "blocks": h.index_size,
            "blocks_crc_checked": blocks_checked,
            "block_crc": h.verify,
            "flags": format!("{:#x}", h.flags & 0x3f),
            "digest": h.flags & ovbd_format::zfile::FLAG_DIGEST != 0,
            "compressed_size": z_size(&layer),
            "original_size": h.original_file_size,
        })
    });
    let v = json!({
        "file": path.display().to_string(),
        "wrapper": layer.wrapper.kind.name(),
        "payload_offset": layer.wrapper.payload_offset,
        "payload_size": layer.wrapper.payload_size,
        "zfile": zinfo,
        "lsmt": {
            "size": l.source().size(),
            "header_flags": l.header.flags,
            "trailer_flags": l.trailer.flags,
            "uuid": l.trailer.uuid,
            "parent_uuid": l.trailer.parent_uuid,
            "virtual_size": l.virtual_size(),
            "index_offset": l.trailer.index_offset,
            "index_entries": l.index_entries,
            "valid_entries": valid,
            "zeroed_entries": zeroed,
            "data_entries": valid - zeroed,
            "padding_entries": l.index_entries - valid,
            "data_bytes": data_sectors * 512,
            "user_tag": String::from_utf8_lossy(&l.trailer.user_tag),
        },
    });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("file:            {}", path.display());
    println!(
        "wrapper:         {} (payload at {}, {} bytes)",
        layer.wrapper.kind.name(),
        layer.wrapper.payload_offset,
        layer.wrapper.payload_size
    );
    match &layer.zfile {
        Some(z) => {
            let h = &z.info;
            println!(
                "zfile:           {} {} KiB blocks x {}, block CRC {}, digest {}, flags {:#x}; all {} blocks checked",
                z.algorithm().name(),
                h.block_size / 1024,
                h.index_size,
                if h.verify { "yes" } else { "no" },
                if h.flags & ovbd_format::zfile::FLAG_DIGEST != 0 { "yes" } else { "no" },
                h.flags & 0x3f,
                blocks_checked
            );
        }
        None => println!("zfile:           none"),
    }
    println!("lsmt size:       {} bytes", l.source().size());
    println!(
        "flags:           header {:#x}, trailer {:#x}",
        l.header.flags, l.trailer.flags
    );
    println!("uuid:            {}", l.trailer.uuid);
    println!("parent uuid:     {}", l.trailer.parent_uuid);
    println!(
        "virtual size:    {} bytes ({:.2} GiB)",
        l.virtual_size(),
        l.virtual_size() as f64 / (1u64 << 30) as f64
    );
    println!(
        "index:           {} entries at offset {}: {} valid ({} data, {} zeroed), {} padding",
        l.index_entries,
        l.trailer.index_offset,
        valid,
        valid - zeroed,
        zeroed,
        l.index_entries - valid
    );
    println!("data:            {} bytes", data_sectors * 512);
    Ok(())
}

fn z_size(layer: &ovbd_format::OpenedLayer) -> u64 {
    layer.wrapper.payload_size
}

fn create_out(path: &Path) -> Result<File> {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))
}

/// Writes through a temporary name and renames, so OUT never holds a half-written file.
fn with_tmp<T>(out: &Path, f: impl FnOnce(&mut File) -> Result<T>) -> Result<T> {
    let mut tmp = out.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    let mut file = create_out(&tmp)?;
    let r = f(&mut file).and_then(|v| {
        file.sync_all()
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, out).with_context(|| format!("renaming to {}", out.display()))?;
        Ok(v)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

pub fn decompress(blob: &Path, out: &Path) -> Result<()> {
    let raw = unwrap(Arc::new(FileSource::open(blob)?))?.lsmt;
    // Validate it is a whole LSMT before writing anything.
    LsmtFile::open(raw.clone())?;
    with_tmp(out, |f| {
        write_blob(
            &*raw,
            f,
            BlobOptions {
                zfile: None,
                tar: false,
            },
        )?;
        Ok(())
    })
}

pub fn compress(lsmt: &Path, out: &Path, z: ZFileOptions, tar: bool) -> Result<()> {
    let src: Arc<dyn ReadAt> = Arc::new(FileSource::open(lsmt)?);
    LsmtFile::open(src.clone())
        .with_context(|| format!("{} is not a committed LSMT layer", lsmt.display()))?;
    let n = with_tmp(out, |f| {
        Ok(write_blob(
            &*src,
            f,
            BlobOptions {
                zfile: Some(z),
                tar,
            },
        )?)
    })?;
    eprintln!("wrote {} ({n} bytes)", out.display());
    Ok(())
}

pub fn create(
    data: &Path,
    index: &Path,
    vsize: u64,
    sparse: bool,
    parent: Option<&str>,
) -> Result<()> {
    let parent = parent.map(parse_uuid).transpose()?;
    let mode = if sparse {
        RwMode::Sparse
    } else {
        RwMode::Append
    };
    RwLayer::create(data, index, vsize, mode, parent.as_deref())?;
    Ok(())
}

pub fn seal(data: &Path, index: &Path) -> Result<()> {
    RwLayer::open(data, index)?.seal()?;
    Ok(())
}

pub fn commit(
    data: &Path,
    index: &Path,
    out: &Path,
    uuid: Option<&str>,
    parent_uuid: Option<&str>,
    zfile: Option<ZFileOptions>,
) -> Result<()> {
    let rw = RwLayer::open(data, index)?;
    if rw.virtual_size() == 0 {
        bail!(
            "{}: virtual size is 0 (stack it on its lowers once to inherit theirs)",
            data.display()
        );
    }
    let info = CommitInfo {
        virtual_size: rw.virtual_size(),
        uuid: uuid
            .map(parse_uuid)
            .transpose()?
            .unwrap_or_else(|| NIL_UUID.to_string()),
        parent_uuid: match parent_uuid {
            Some(p) => parse_uuid(p)?,
            None => rw.parent_uuid(),
        },
        user_tag: Vec::new(),
    };
    let segs = rw.segments();
    let src = rw.data_source()?;
    match zfile {
        None => with_tmp(out, |f| {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
            commit_compact(&segs, &*src, &info, &mut w)?;
            w.flush()?;
            Ok(())
        }),
        Some(z) => {
            let mut lsmt = out.as_os_str().to_owned();
            lsmt.push(".lsmt");
            let lsmt = PathBuf::from(lsmt);
            with_tmp(&lsmt, |f| {
                let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
                commit_compact(&segs, &*src, &info, &mut w)?;
                w.flush()?;
                Ok(())
            })?;
            let r = compress(&lsmt, out, z, true);
            let _ = std::fs::remove_file(&lsmt);
            r
        }
    }
}

pub fn export(layers: &[PathBuf], out: &Path) -> Result<()> {
    let mut opened = Vec::with_capacity(layers.len());
    for p in layers {
        opened.push(open_layer_file(p)?.lsmt);
    }
    let stack = LayerStack::new(opened)?;
    let name = out.display().to_string();
    with_tmp(out, |f| Ok(stack.export_raw(f, &name)?))
}
