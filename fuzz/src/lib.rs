//! What the fuzz targets share: a scratch folder per process (in memory where the
//! machine has `/dev/shm`) and a way to cut one input into several files.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Cuts an input into parts: the parts of a folder (config, weights, ...) are joined with
/// this line in the seeds, and a mutated input is cut the same way.
pub const SEPARATOR: &[u8] = b"\n--routelm-fuzz-part--\n";

/// This process's scratch folder, made once and emptied of nothing: every input
/// overwrites the same few names.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("routelm-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("a scratch folder");
        dir
    })
}

/// A fresh folder `name` inside the scratch folder (emptied first).
pub fn folder(name: &str) -> PathBuf {
    let dir = scratch().join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch folder");
    dir
}

/// Write `bytes` to `dir/name` and return its path.
pub fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("the scratch folder is writable");
    path
}

/// The input cut at each [`SEPARATOR`]; always `n` parts (missing ones are empty, extra
/// ones stay joined to the last).
pub fn parts(data: &[u8], n: usize) -> Vec<&[u8]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = data;
    while out.len() + 1 < n {
        match find(rest, SEPARATOR) {
            Some(at) => {
                out.push(&rest[..at]);
                rest = &rest[at + SEPARATOR.len()..];
            }
            None => break,
        }
    }
    out.push(rest);
    while out.len() < n {
        out.push(&[]);
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
