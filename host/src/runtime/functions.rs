//! Cranelift's per-function compilation cache, kept beside the precompiled artifacts.
//!
//! Checks written in one language share almost all of their code: every Python check carries
//! the same CPython interpreter, every JavaScript check the same StarlingMonkey engine, and the
//! check's own source is data in the memory image, not code. A precompiled artifact is keyed
//! by the whole component, so a check changed by one line compiled for seconds again; with
//! this cache Cranelift finds each function it compiled before (keyed by a hash of the
//! function and the target, which Cranelift computes, and checked against its own version) and
//! compiles only what is new.
//!
//! One file, `functions.cache`, append-only: records of the 32-byte key, the value's length,
//! the first 8 bytes of the value's SHA-256, and the value. Only an index (key → where) lives in
//! memory. A torn last record (a crash mid-append) is cut off when the file is opened; a record
//! whose bytes no longer match their hash is ignored and compiled afresh, so a damaged file
//! costs a compile, never wrong code. The file is trusted as the artifacts are: only the host
//! writes it, in its own data dir (or the user's cache dir for `stepwise dev`). When it would
//! pass [`MAX_BYTES`] it starts over empty. A second process on the same directory (two
//! `stepwise dev` at once) finds the file locked and compiles without the cache.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use sha2::{Digest, Sha256};

/// The file's name in the artifacts directory.
const FILE_NAME: &str = "functions.cache";
/// What the file may grow to before it starts over: the functions of a few dozen distinct
/// large components.
const MAX_BYTES: u64 = 512 << 20;
const KEY: usize = 32;
const CHECK: usize = 8;
const HEADER: usize = KEY + 4 + CHECK;

type Key = [u8; KEY];

/// Where a value is in the file, and the hash it must have.
#[derive(Clone, Copy)]
struct Entry {
    offset: u64,
    len: u32,
    check: [u8; CHECK],
}

struct Index {
    entries: HashMap<Key, Entry>,
    /// Where the next record goes: the file's length.
    end: u64,
}

pub(super) struct FunctionCache {
    file: File,
    index: Mutex<Index>,
    max_bytes: u64,
}

impl std::fmt::Debug for FunctionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionCache").finish_non_exhaustive()
    }
}

impl FunctionCache {
    /// The cache in `dir`, opened (or created) once per process: runtimes of one process on
    /// the same directory (a host started again in the same process) share it. `None` when
    /// the file cannot be had: another process holds it, or it cannot be opened; compiling
    /// then simply goes without.
    pub(super) fn shared(dir: &Path) -> Option<Arc<FunctionCache>> {
        static OPEN: Mutex<Vec<(PathBuf, Weak<FunctionCache>)>> = Mutex::new(Vec::new());
        let dir = dir.canonicalize().ok()?;
        let mut open = OPEN.lock().unwrap_or_else(|poison| poison.into_inner());
        open.retain(|(_, cache)| cache.strong_count() > 0);
        if let Some(cache) = open
            .iter()
            .find(|(opened, _)| *opened == dir)
            .and_then(|(_, cache)| cache.upgrade())
        {
            return Some(cache);
        }
        let cache = Arc::new(FunctionCache::open(&dir, MAX_BYTES)?);
        open.push((dir, Arc::downgrade(&cache)));
        Some(cache)
    }

    fn open(dir: &Path, max_bytes: u64) -> Option<FunctionCache> {
        let path = dir.join(FILE_NAME);
        let opened = (|| -> std::io::Result<Option<FunctionCache>> {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)?;
            if file.try_lock().is_err() {
                return Ok(None);
            }
            let index = read_index(&file)?;
            file.set_len(index.end)?;
            Ok(Some(FunctionCache {
                file,
                index: Mutex::new(index),
                max_bytes,
            }))
        })();
        match opened {
            Ok(Some(cache)) => Some(cache),
            Ok(None) => {
                tracing::debug!(path = %path.display(), "the function cache is in use by another process; compiling without it");
                None
            }
            Err(error) => {
                tracing::warn!(path = %path.display(), "compiling without the function cache: {error}");
                None
            }
        }
    }

    /// Bytes the file holds now.
    #[cfg(test)]
    fn len(&self) -> u64 {
        self.lock().end
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<Cow<'_, [u8]>> {
        let key: &Key = key.try_into().ok()?;
        let entry = *self.lock().entries.get(key)?;
        let mut value = vec![0; entry.len as usize];
        let read = self.file.read_exact_at(&mut value, entry.offset);
        if read.is_err() || check(&value) != entry.check {
            let mut index = self.lock();
            if index
                .entries
                .get(key)
                .is_some_and(|now| now.offset == entry.offset)
            {
                index.entries.remove(key);
            }
            return None;
        }
        Some(Cow::Owned(value))
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let (Ok(key), Ok(len)) = (<&Key>::try_from(key), u32::try_from(value.len())) else {
            return false;
        };
        let check = check(&value);
        let mut record = Vec::with_capacity(HEADER + value.len());
        record.extend_from_slice(key);
        record.extend_from_slice(&len.to_le_bytes());
        record.extend_from_slice(&check);
        record.extend_from_slice(&value);
        let mut index = self.lock();
        let record_bytes = record.len() as u64;
        if record_bytes > self.max_bytes {
            return false;
        }
        if index.end + record_bytes > self.max_bytes {
            if self.file.set_len(0).is_err() {
                return false;
            }
            index.entries.clear();
            index.end = 0;
        }
        let offset = index.end;
        if self.file.write_all_at(&record, offset).is_err() {
            // What was written may be partial: cut it off so that the file stays well formed.
            let _ = self.file.set_len(offset);
            return false;
        }
        index.end += record_bytes;
        index.entries.insert(
            *key,
            Entry {
                offset: offset + HEADER as u64,
                len,
                check,
            },
        );
        true
    }
}

fn check(value: &[u8]) -> [u8; CHECK] {
    let digest = Sha256::digest(value);
    let mut check = [0; CHECK];
    check.copy_from_slice(&digest[..CHECK]);
    check
}

/// Reads every record's header; `end` is where the last whole record ends.
fn read_index(file: &File) -> std::io::Result<Index> {
    let size = file.metadata()?.len();
    let mut reader = BufReader::new(file);
    reader.seek(SeekFrom::Start(0))?;
    let mut entries = HashMap::new();
    let mut end = 0u64;
    let mut header = [0u8; HEADER];
    while end + HEADER as u64 <= size {
        reader.read_exact(&mut header)?;
        let key: Key = header[..KEY].try_into().expect("32 bytes");
        let len = u32::from_le_bytes(header[KEY..KEY + 4].try_into().expect("4 bytes"));
        let check = header[KEY + 4..].try_into().expect("8 bytes");
        let offset = end + HEADER as u64;
        if offset + u64::from(len) > size {
            break;
        }
        reader.seek_relative(i64::from(len))?;
        entries.insert(key, Entry { offset, len, check });
        end = offset + u64::from(len);
    }
    Ok(Index { entries, end })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::CacheStore;

    #[test]
    fn values_outlive_the_process_and_a_torn_or_damaged_record_is_a_miss() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let cache = FunctionCache::open(dir.path(), MAX_BYTES).expect("the cache");
        assert!(cache.insert(&[1; 32], b"first".to_vec()));
        assert!(cache.insert(&[2; 32], b"second".to_vec()));
        assert!(!cache.insert(&[3; 31], b"a key of the wrong size".to_vec()));
        assert_eq!(cache.get(&[1; 32]).as_deref(), Some(&b"first"[..]));
        assert!(
            FunctionCache::open(dir.path(), MAX_BYTES).is_none(),
            "another process must not append to the same file"
        );

        let whole = cache.len();
        drop(cache);

        // A crash in the middle of appending a record: the torn tail is cut off.
        let path = dir.path().join(FILE_NAME);
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("the file");
        file.write_all_at(&[9; HEADER + 2], whole)
            .expect("a torn record");
        drop(file);
        let cache = FunctionCache::open(dir.path(), MAX_BYTES).expect("reopened");
        assert_eq!(cache.len(), whole);
        assert_eq!(cache.get(&[2; 32]).as_deref(), Some(&b"second"[..]));
        drop(cache);

        // A value whose bytes changed on disk is compiled afresh, never handed to Cranelift.
        let file = OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("the file");
        file.write_all_at(b"F", HEADER as u64)
            .expect("one byte changed");
        drop(file);
        let cache = FunctionCache::open(dir.path(), MAX_BYTES).expect("reopened");
        assert_eq!(cache.get(&[1; 32]), None);
        assert_eq!(cache.get(&[2; 32]).as_deref(), Some(&b"second"[..]));
        assert!(cache.insert(&[1; 32], b"first".to_vec()));
        assert_eq!(cache.get(&[1; 32]).as_deref(), Some(&b"first"[..]));
    }

    #[test]
    fn runtimes_of_one_process_share_the_file() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let shared = FunctionCache::shared(dir.path()).expect("the shared cache");
        let again = FunctionCache::shared(dir.path()).expect("again");
        assert!(Arc::ptr_eq(&shared, &again));
        drop((shared, again));
        assert!(
            FunctionCache::open(dir.path(), MAX_BYTES).is_some(),
            "let go with the last"
        );
    }

    #[test]
    fn a_full_cache_starts_over() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let cache = FunctionCache::open(dir.path(), 1_000).expect("the cache");
        let big = vec![7u8; 500];
        assert!(cache.insert(&[1; 32], big.clone()));
        assert!(cache.insert(&[2; 32], big.clone()), "starts over");
        assert!(
            !cache.insert(&[3; 32], vec![0; 1_000]),
            "a value past the bound is not kept"
        );
        assert_eq!(cache.get(&[1; 32]), None);
        assert_eq!(
            cache.get(&[2; 32]).map(|value| value.len()),
            Some(big.len())
        );
        assert_eq!(cache.len(), (HEADER + big.len()) as u64);
    }
}
