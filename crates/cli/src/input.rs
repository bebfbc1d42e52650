//! Input files of `replay` and `trace-report`: a path or `-` for stdin, and
//! zstd-compressed files through the `zstd` program, so that no compression
//! library is built.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};

const ZSTD_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Opens a file (or stdin for `-`) for reading line by line, decompressing
/// zstd on the fly.
pub fn open(path: &Path) -> Result<Box<dyn BufRead>, String> {
    if path == Path::new("-") {
        return Ok(Box::new(BufReader::new(std::io::stdin())));
    }
    let name = path.display();
    let mut f = BufReader::new(File::open(path).map_err(|e| format!("{name}: {e}"))?);
    let head = f.fill_buf().map_err(|e| format!("{name}: {e}"))?;
    if !head.starts_with(&ZSTD_MAGIC) {
        return Ok(Box::new(f));
    }
    let mut child = Command::new("zstd")
        .args(["-dc", "--"])
        .arg(path)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{name} is zstd-compressed and `zstd` could not run: {e}"))?;
    let out = child.stdout.take().ok_or_else(|| format!("zstd -dc {name}: no output"))?;
    Ok(Box::new(BufReader::new(Unzstd { child, out })))
}

/// The output of `zstd -dc`; its end is an error unless zstd succeeded, so
/// that a corrupt file never reads as a short one.
struct Unzstd {
    child: Child,
    out: ChildStdout,
}

impl Read for Unzstd {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.out.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let status = self.child.wait()?;
            if !status.success() {
                return Err(std::io::Error::other(format!("zstd -dc: {status}")));
            }
        }
        Ok(n)
    }
}

/// Reads a whole input as text.
pub fn read_to_string(path: &Path) -> Result<String, String> {
    let mut text = String::new();
    open(path)?
        .read_to_string(&mut text)
        .map_err(|e| format!("{}: {e} (not UTF-8 text?)", path.display()))?;
    Ok(text)
}

/// Calls `f` on each line, without its line end; bytes that are not UTF-8
/// (console noise) become U+FFFD instead of failing the whole file.
pub fn for_each_line(path: &Path, mut f: impl FnMut(&str)) -> Result<(), String> {
    let mut r = open(path)?;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = r.read_until(b'\n', &mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            return Ok(());
        }
        let line = String::from_utf8_lossy(&buf);
        f(line.trim_end_matches(['\n', '\r']));
    }
}
