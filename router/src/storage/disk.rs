//! The file I/O under the journal and the database, as a seam that tests
//! replace.
//!
//! [`OsDisk`] is the real thing: the journal is a `std::fs::File`, the
//! database is opened by redb itself (its own file backend, with its file
//! lock). [`SimDisk`] keeps files in memory and models what a disk promises:
//! what a completed sync covered survives a power cut; everything written
//! after the last sync may be dropped, kept, or torn at 512-byte sector
//! boundaries ([`SimDisk::crash`], chosen by a seed). It also fails on
//! demand: `EIO` from a sync ([`Faults::fail_syncs`]), `ENOSPC` once the
//! files would outgrow a size ([`Faults::space`]). A failed sync loses the
//! writes it was to cover for good, as Linux does (a later sync that
//! succeeds does not bring them back): the "fsyncgate" trap a store must
//! not fall into by retrying the sync and acknowledging.

use std::collections::HashMap;
use std::fmt::Debug;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One open file.
#[allow(clippy::len_without_is_empty)]
pub trait DiskFile: Send + Sync + Debug {
    /// Its length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset` (an error if the file is shorter).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes `data` at `offset`, growing the file if needed.
    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()>;
    /// Truncates or extends (with zeros) to `len`.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync(&self) -> io::Result<()>;
}

/// Where the journal and the database live.
pub trait Disk: Send + Sync + Debug {
    /// The file at `path`, if it exists.
    fn open(&self, path: &Path) -> io::Result<Option<Arc<dyn DiskFile>>>;
    /// Atomically creates `path` holding `len` zero bytes (written, not a
    /// hole), durable when this returns.
    fn create_zeroed(&self, path: &Path, len: u64) -> io::Result<Arc<dyn DiskFile>>;
    /// Removes `path`.
    fn remove(&self, path: &Path) -> io::Result<()>;
    /// The database file at `path` (created if missing) for redb to use
    /// through [`DiskBackend`], or `None` to let redb open it itself.
    fn redb_file(&self, path: &Path) -> io::Result<Option<Arc<dyn DiskFile>>>;
    /// Bytes free for new data on the file system holding `path`.
    fn free_bytes(&self, path: &Path) -> io::Result<u64>;
}

/// The operating system's files.
#[derive(Debug, Default)]
pub struct OsDisk;

#[derive(Debug)]
struct OsFile(std::fs::File);

impl DiskFile for OsFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.metadata()?.len())
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.0, buf, offset)
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::write_all_at(&self.0, data, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync(&self) -> io::Result<()> {
        self.0.sync_data()
    }
}

impl Disk for OsDisk {
    fn open(&self, path: &Path) -> io::Result<Option<Arc<dyn DiskFile>>> {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
        {
            Ok(f) => Ok(Some(Arc::new(OsFile(f)))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn create_zeroed(&self, path: &Path, len: u64) -> io::Result<Arc<dyn DiskFile>> {
        let tmp = path.with_extension("new");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        let file = OsFile(f);
        // Written, not just allocated: syncing a write into a hole or an
        // unwritten extent also syncs the file system's metadata.
        write_zeros(&file, len)?;
        file.0.sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(Arc::new(file))
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        std::fs::remove_file(path)
    }

    fn redb_file(&self, _path: &Path) -> io::Result<Option<Arc<dyn DiskFile>>> {
        Ok(None)
    }

    fn free_bytes(&self, path: &Path) -> io::Result<u64> {
        let dir = path.parent().unwrap_or(Path::new("."));
        let s = nix::sys::statvfs::statvfs(dir).map_err(io::Error::from)?;
        Ok(s.blocks_available() as u64 * s.fragment_size() as u64)
    }
}

/// Writes `len` zero bytes from the start of `file`, in 1 MiB writes.
pub(crate) fn write_zeros(file: &dyn DiskFile, len: u64) -> io::Result<()> {
    let chunk = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(chunk.len() as u64) as usize;
        file.write_at(at, &chunk[..n])?;
        at += n as u64;
    }
    Ok(())
}

/// Faults a [`SimDisk`] injects, shared by all its files.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every sync fails with `EIO` while set.
    pub fail_syncs: AtomicBool,
    /// Total bytes the files may take (0: unlimited); a write or a
    /// `set_len` past it fails with `ENOSPC`.
    pub space: AtomicU64,
    /// Syncs that failed.
    pub failed_syncs: AtomicU64,
    /// Bytes all files take now.
    used: AtomicU64,
}

impl Faults {
    /// Accounts a file growing from `old` to `new` bytes; `ENOSPC` if it
    /// would pass [`Faults::space`].
    fn resize(&self, old: u64, new: u64) -> io::Result<()> {
        let space = self.space.load(Ordering::Relaxed);
        let used = self.used.load(Ordering::Relaxed);
        if space > 0 && new > old && used - old.min(used) + new > space {
            return Err(io::Error::from_raw_os_error(
                nix::errno::Errno::ENOSPC as i32,
            ));
        }
        self.used
            .store(used - old.min(used) + new, Ordering::Relaxed);
        Ok(())
    }
}

/// Files in memory, with a model of what a power cut keeps.
#[derive(Debug, Default)]
pub struct SimDisk {
    files: Mutex<HashMap<PathBuf, Arc<SimFile>>>,
    /// The faults to inject.
    pub faults: Arc<Faults>,
}

#[derive(Debug)]
enum Op {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct SimState {
    /// What reads see.
    live: Vec<u8>,
    /// What a power cut keeps for sure: the state at the last sync.
    durable: Vec<u8>,
    /// Changes since the last sync, in order.
    unsynced: Vec<Op>,
}

#[derive(Debug)]
struct SimFile {
    state: Mutex<SimState>,
    faults: Arc<Faults>,
}

fn apply(buf: &mut Vec<u8>, op: &Op) {
    match op {
        Op::Write(off, data) => {
            let end = *off as usize + data.len();
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[*off as usize..end].copy_from_slice(data);
        }
        Op::SetLen(len) => buf.resize(*len as usize, 0),
    }
}

/// A small deterministic generator for crash choices (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

impl DiskFile for SimFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().expect("sim file").live.len() as u64)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let s = self.state.lock().expect("sim file");
        let end = offset as usize + buf.len();
        let src = s
            .live
            .get(offset as usize..end)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock().expect("sim file");
        let old = s.live.len() as u64;
        let new = old.max(offset + data.len() as u64);
        self.faults.resize(old, new)?;
        let op = Op::Write(offset, data.to_vec());
        apply(&mut s.live, &op);
        s.unsynced.push(op);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock().expect("sim file");
        self.faults.resize(s.live.len() as u64, len)?;
        let op = Op::SetLen(len);
        apply(&mut s.live, &op);
        s.unsynced.push(op);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut s = self.state.lock().expect("sim file");
        let ops = std::mem::take(&mut s.unsynced);
        if self.faults.fail_syncs.load(Ordering::Relaxed) {
            // The writes stay visible but are never written back: a later
            // sync that succeeds does not cover them.
            self.faults.failed_syncs.fetch_add(1, Ordering::Relaxed);
            return Err(io::Error::from_raw_os_error(nix::errno::Errno::EIO as i32));
        }
        for op in &ops {
            apply(&mut s.durable, op);
        }
        Ok(())
    }
}

/// A [`DiskFile`] as a redb backend.
#[derive(Debug)]
pub struct DiskBackend(pub Arc<dyn DiskFile>);

impl redb::StorageBackend for DiskBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.0.read_at(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        self.0.sync()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        self.0.write_at(offset, data)
    }
}

impl SimDisk {
    /// An empty disk.
    pub fn new() -> Arc<SimDisk> {
        Arc::new(SimDisk::default())
    }

    fn file(&self, path: &Path, create: bool) -> Option<Arc<SimFile>> {
        let mut files = self.files.lock().expect("sim files");
        if let Some(f) = files.get(path) {
            return Some(f.clone());
        }
        if !create {
            return None;
        }
        let f = Arc::new(SimFile {
            state: Mutex::default(),
            faults: self.faults.clone(),
        });
        files.insert(path.to_path_buf(), f.clone());
        Some(f)
    }

    /// The disk after a power cut now: per file, what the last sync
    /// covered, then each later change dropped, kept, or torn (some of its
    /// 512-byte sectors kept, the others not), as `seed` chooses. No faults
    /// are carried over.
    pub fn crash(&self, seed: u64) -> Arc<SimDisk> {
        let mut rng = Rng(seed | 1);
        let files = self.files.lock().expect("sim files");
        let mut paths: Vec<&PathBuf> = files.keys().collect();
        paths.sort();
        let out = SimDisk::new();
        for path in paths {
            let s = files[path].state.lock().expect("sim file");
            let mut image = s.durable.clone();
            for op in &s.unsynced {
                match (op, rng.next() % 3) {
                    (_, 0) => {}
                    (op, 1) => apply(&mut image, op),
                    (Op::SetLen(_), _) => {}
                    (Op::Write(off, data), _) => {
                        // Torn: sector by sector, aligned to the file.
                        let mut at = *off as usize;
                        let end = at + data.len();
                        while at < end {
                            let next = ((at / 512) + 1) * 512;
                            let stop = next.min(end);
                            if rng.next().is_multiple_of(2) {
                                let part = data[at - *off as usize..stop - *off as usize].to_vec();
                                apply(&mut image, &Op::Write(at as u64, part));
                            }
                            at = stop;
                        }
                    }
                }
            }
            let f = out.file(path, true).expect("created");
            let mut st = f.state.lock().expect("sim file");
            out.faults
                .used
                .fetch_add(image.len() as u64, Ordering::Relaxed);
            st.live = image.clone();
            st.durable = image;
        }
        out
    }

    /// Bytes the files take now.
    pub fn used(&self) -> u64 {
        self.faults.used.load(Ordering::Relaxed)
    }

    /// Where `needle` first occurs in the live content of `path`.
    pub fn find(&self, path: &Path, needle: &[u8]) -> Option<u64> {
        let f = self.file(path, false)?;
        let s = f.state.lock().expect("sim file");
        s.live
            .windows(needle.len())
            .position(|w| w == needle)
            .map(|p| p as u64)
    }

    /// Zeroes `len` bytes of `path` from `offset`, durably (a damaged page).
    pub fn zero(&self, path: &Path, offset: u64, len: u64) {
        if let Some(f) = self.file(path, false) {
            let mut guard = f.state.lock().expect("sim file");
            let s = &mut *guard;
            for b in [&mut s.live, &mut s.durable] {
                let end = ((offset + len) as usize).min(b.len());
                b[(offset as usize).min(end)..end].fill(0);
            }
        }
    }
}

impl Disk for SimDisk {
    fn open(&self, path: &Path) -> io::Result<Option<Arc<dyn DiskFile>>> {
        Ok(self.file(path, false).map(|f| f as Arc<dyn DiskFile>))
    }

    fn create_zeroed(&self, path: &Path, len: u64) -> io::Result<Arc<dyn DiskFile>> {
        self.faults.resize(0, len)?;
        let _ = Disk::remove(self, path);
        let f = self.file(path, true).expect("created");
        let mut s = f.state.lock().expect("sim file");
        s.live = vec![0; len as usize];
        s.durable = s.live.clone();
        drop(s);
        Ok(f)
    }

    fn remove(&self, path: &Path) -> io::Result<()> {
        let f = self
            .files
            .lock()
            .expect("sim files")
            .remove(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        let len = f.state.lock().expect("sim file").live.len() as u64;
        let _ = self.faults.resize(len, 0);
        Ok(())
    }

    fn redb_file(&self, path: &Path) -> io::Result<Option<Arc<dyn DiskFile>>> {
        Ok(Some(self.file(path, true).expect("created")))
    }

    fn free_bytes(&self, _path: &Path) -> io::Result<u64> {
        let space = self.faults.space.load(Ordering::Relaxed);
        Ok(if space == 0 {
            u64::MAX
        } else {
            space.saturating_sub(self.used())
        })
    }
}
