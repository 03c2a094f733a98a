//! An exclusive lock on a node's data directory, held for the life of the process: two
//! servers writing one directory would interleave their logs and each fsync the other's
//! half-written files.
//!
//! `flock` on `<data_dir>/LOCK`: the kernel drops it when the process dies however it dies, so
//! a crashed node never leaves a stale lock behind. The holder writes its pid into the file so
//! that the refusal can name it.

use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::path::{Path, PathBuf};

/// The lock file's name inside the data directory.
pub const LOCK_FILE: &str = "LOCK";

/// Holds the lock until dropped (the process's end).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    /// Creates `dir` if needed and locks it, or says who holds it.
    pub fn acquire(dir: &Path) -> Result<DataDirLock, String> {
        crate::storage::create_dir_durable(dir)
            .map_err(|e| format!("cannot create data directory {}: {e}", dir.display()))?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns; no memory is shared.
        let locked = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if locked != 0 {
            let error = std::io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let holder = match text.trim().parse::<u32>() {
                    Ok(pid) => format!("process {pid}"),
                    Err(_) => "another process".to_string(),
                };
                return Err(format!(
                    "data directory {} is in use by {holder} (lock {}); stop it first, or give \
                     this node another data_dir",
                    dir.display(),
                    path.display()
                ));
            }
            return Err(format!("cannot lock {}: {error}", path.display()));
        }
        // The pid is a courtesy for the refusal; the lock itself is the flock.
        let pid = std::process::id();
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{pid}"))
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(DataDirLock { _file: file, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_the_directory_is_refused_naming_the_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        let held = DataDirLock::acquire(&data).expect("first lock");
        // flock locks belong to the open file description: a second open in the same process
        // conflicts like another process would.
        let refused = DataDirLock::acquire(&data).expect_err("second lock refused");
        assert!(refused.contains(&data.display().to_string()), "{refused}");
        assert!(
            refused.contains(&format!("process {}", std::process::id())),
            "{refused}"
        );
        drop(held);
        DataDirLock::acquire(&data).expect("free again once dropped");
    }
}
