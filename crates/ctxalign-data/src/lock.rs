//! The lock a job holds on the folder it writes: a training run's output folder, a sweep's runs, a
//! folder of shards. Two jobs started into one folder would otherwise both run to the end (exit 0)
//! and leave it holding run A's model beside run B's metrics and checkpoints.
//!
//! The lock is a file, [`LOCK_FILE`], created with `create_new` (atomic: of two jobs, one creates
//! it, the other finds it) and holding the holder's pid, host, job and start time. It is removed
//! when the [`FolderLock`] is dropped — at the end of the job, on an error (the `?` that returns
//! drops it) and on a panic that unwinds — with the folder itself when the lock created it and
//! nothing else was written there (a job refused before any work leaves nothing behind). A process killed outright leaves the file: the next job
//! finds it, sees that the pid is not running on this host, says so and takes the lock over. A lock
//! held on another host cannot be checked from here and is never taken over.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::DataError;

/// The lock file's name inside the locked folder.
pub const LOCK_FILE: &str = ".ctxalign-lock";

/// Who holds a lock (the lock file's content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockHolder {
    pub pid: u32,
    pub host: String,
    /// The job, e.g. `pretrain`.
    pub job: String,
    /// Seconds since the Unix epoch.
    pub started: u64,
    /// Unique to one acquisition: a lock file is removed only by the lock that wrote it.
    pub token: String,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "{} (pid {} on {}, started {})", self.job, self.pid, self.host, utc_time(self.started))
    }
}

/// A held lock on a folder; dropping it releases the lock.
#[derive(Debug)]
pub struct FolderLock {
    dir: PathBuf,
    holder: LockHolder,
    taken_over: Option<LockHolder>,
    /// The lock made the folder: a job refused before it wrote anything leaves no empty folder.
    created_dir: bool,
}

impl FolderLock {
    /// Locks `dir` (created if missing) for `job`. A lock held by a running process, or by one on
    /// another host, is [`DataError::Locked`] naming the folder and the holder; a lock left by a
    /// process that is gone (killed, crashed) is taken over, and [`FolderLock::taken_over`] says
    /// whose it was.
    pub fn acquire(dir: &Path, job: &str) -> Result<Self, DataError> {
        let created_dir = !dir.exists();
        std::fs::create_dir_all(dir).map_err(|e| DataError::write(dir, e))?;
        let file = dir.join(LOCK_FILE);
        let holder = LockHolder {
            pid: std::process::id(),
            host: host_name(),
            job: job.to_string(),
            started: now(),
            token: token(),
        };
        let mut taken_over = None;
        // Two rounds at most: a stale lock is moved away once, then the file is created again.
        for _ in 0..2 {
            match create(&file, &holder) {
                Ok(()) => return Ok(Self { dir: dir.to_owned(), holder, taken_over, created_dir }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(DataError::write(&file, e)),
            }
            let found = read_holder(&file)?;
            if !is_stale(&found, &holder.host) {
                return Err(DataError::Locked { dir: dir.to_owned(), holder: Box::new(found) });
            }
            remove_stale(&file, &found)?;
            taken_over = Some(found);
        }
        // Another job took the stale lock over between our two rounds: it holds the folder now.
        Err(DataError::Locked { dir: dir.to_owned(), holder: Box::new(read_holder(&file)?) })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn holder(&self) -> &LockHolder {
        &self.holder
    }

    /// The stale lock this one replaced (its process was gone), for the job's report.
    pub fn taken_over(&self) -> Option<&LockHolder> {
        self.taken_over.as_ref()
    }

    /// "took over the lock of pretrain (pid 123 on host, started …), whose process is gone", when
    /// this lock replaced a stale one.
    pub fn notice(&self) -> Option<String> {
        self.taken_over.as_ref().map(|old| {
            format!("{}: took over the lock left by {old}, whose process is no longer running", self.dir.display())
        })
    }

    /// Whether this lock is the one of `dir` (the same folder, however named).
    pub fn covers(&self, dir: &Path) -> bool {
        match (std::fs::canonicalize(&self.dir), std::fs::canonicalize(dir)) {
            (Ok(a), Ok(b)) => a == b,
            _ => self.dir == dir,
        }
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        // Only our own file: had it been replaced (removed by hand, taken over), it is not ours.
        let file = self.dir.join(LOCK_FILE);
        if read_holder(&file).is_ok_and(|h| h.token == self.holder.token) {
            let _ = std::fs::remove_file(&file);
            if self.created_dir {
                // Fails, as it should, unless the folder is empty: nothing was written.
                let _ = std::fs::remove_dir(&self.dir);
            }
        }
    }
}

fn create(file: &Path, holder: &LockHolder) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(file)?;
    let written = serde_json::to_vec_pretty(holder).map_err(std::io::Error::other).and_then(|json| {
        f.write_all(&json)?;
        f.sync_all()
    });
    if written.is_err() {
        let _ = std::fs::remove_file(file);
    }
    written
}

fn read_holder(file: &Path) -> Result<LockHolder, DataError> {
    let text = std::fs::read_to_string(file).map_err(|e| DataError::io(file, e))?;
    serde_json::from_str(&text).map_err(|e| {
        DataError::format(file, format!("not a ctxalign lock file ({e}); delete it if no job is writing this folder"))
    })
}

/// A lock is stale when it was taken on this host by a process that is no longer running.
fn is_stale(found: &LockHolder, this_host: &str) -> bool {
    found.host == this_host && !process_running(found.pid)
}

/// Moves the stale lock `found` out of the way. Renaming first (atomic) and checking what was moved
/// keeps two jobs that both found it stale from removing a fresh lock: the second moves the
/// first's new lock, sees it is not the stale one, and puts it back.
fn remove_stale(file: &Path, found: &LockHolder) -> Result<(), DataError> {
    let aside = file.with_file_name(format!("{LOCK_FILE}.stale-{}-{}", std::process::id(), token()));
    match std::fs::rename(file, &aside) {
        Ok(()) => {}
        // Someone else moved it meanwhile: nothing left to remove.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(DataError::write(file, e)),
    }
    let moved = read_holder(&aside);
    if moved.as_ref().is_ok_and(|m| m == found) {
        let _ = std::fs::remove_file(&aside);
        return Ok(());
    }
    // Not the stale lock: a fresh one. Put it back unless yet another appeared (then the folder is
    // taken either way, and the next round reports it).
    let _ = std::fs::hard_link(&aside, file);
    let _ = std::fs::remove_file(&aside);
    Ok(())
}

#[cfg(unix)]
fn process_running(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else { return true };
    // Signal 0 checks only that the process exists; EPERM means it exists under another user.
    // SAFETY: kill with signal 0 sends nothing and touches no memory.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

#[cfg(not(unix))]
fn process_running(_pid: u32) -> bool {
    // Cannot be told here: a lock is never taken over, the message says which file to delete.
    true
}

/// This machine's name (`/proc/sys/kernel/hostname`, `/etc/hostname`, `$HOSTNAME`,
/// `$COMPUTERNAME`), else "unknown-host".
pub fn host_name() -> String {
    let from_file = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    from_file("/proc/sys/kernel/hostname")
        .or_else(|| from_file("/etc/hostname"))
        .or_else(|| std::env::var("HOSTNAME").ok().filter(|s| !s.is_empty()))
        .or_else(|| std::env::var("COMPUTERNAME").ok().filter(|s| !s.is_empty()))
        .unwrap_or_else(|| "unknown-host".into())
}

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn token() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{nanos:x}-{n}", std::process::id())
}

/// `2026-12-04 10:32:05 UTC` from seconds since the epoch (the civil-from-days algorithm).
fn utc_time(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC", rem / 3600, rem / 60 % 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_holder(dir: &Path, holder: &LockHolder) {
        std::fs::write(dir.join(LOCK_FILE), serde_json::to_vec(holder).unwrap()).unwrap();
    }

    /// A pid that is certainly not running: a child that has exited and been waited for.
    #[cfg(unix)]
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn a_held_folder_is_refused_naming_the_holder_and_released_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("run");
        let first = FolderLock::acquire(&dir, "pretrain").unwrap();
        assert!(dir.join(LOCK_FILE).is_file());
        assert!(first.taken_over().is_none() && first.covers(&dir));
        match FolderLock::acquire(&dir, "pretrain") {
            Err(e @ DataError::Locked { .. }) => {
                let msg = e.to_string();
                let pid = format!("pid {}", std::process::id());
                assert!(msg.contains("run is in use by another job: pretrain") && msg.contains(&pid), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        drop(first);
        assert!(!dir.exists(), "released on drop, with the empty folder the lock made");
        // Released on an error path too: the guard is dropped by the `?` that returns.
        let failing = || -> Result<(), DataError> {
            let _lock = FolderLock::acquire(&dir, "shards")?;
            std::fs::write(dir.join("part"), b"x").unwrap();
            Err(DataError::format(&dir, "the job failed"))
        };
        assert!(failing().is_err());
        assert!(!dir.join(LOCK_FILE).exists() && dir.join("part").is_file(), "released; what was written stays");
        let again = FolderLock::acquire(&dir, "pretrain").unwrap();
        // A lock file that another acquisition replaced is not removed by the old guard.
        std::fs::remove_file(dir.join(LOCK_FILE)).unwrap();
        let other = FolderLock::acquire(&dir, "finetune-s1").unwrap();
        drop(again);
        assert!(dir.join(LOCK_FILE).is_file(), "the newer lock stays");
        drop(other);
    }

    #[cfg(unix)]
    #[test]
    fn a_stale_lock_is_taken_over_and_another_hosts_is_not() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let stale = LockHolder {
            pid: dead_pid(),
            host: host_name(),
            job: "pretrain".into(),
            started: 1_700_000_000,
            token: "old".into(),
        };
        write_holder(dir, &stale);
        let lock = FolderLock::acquire(dir, "pretrain").unwrap();
        assert_eq!(lock.taken_over(), Some(&stale));
        let notice = lock.notice().unwrap();
        assert!(notice.contains(&format!("pid {}", stale.pid)) && notice.contains("2023-11-14 22:13:20 UTC"), "{notice}");
        assert_eq!(read_holder(&dir.join(LOCK_FILE)).unwrap().token, lock.holder().token);
        let leftovers = std::fs::read_dir(dir).unwrap().count();
        assert_eq!(leftovers, 1, "only the new lock file");
        drop(lock);
        // On another host the pid means nothing here: refused, never taken over.
        let remote = LockHolder { host: "elsewhere".into(), ..stale };
        write_holder(dir, &remote);
        let msg = FolderLock::acquire(dir, "pretrain").unwrap_err().to_string();
        assert!(msg.contains("on elsewhere") && msg.contains(LOCK_FILE), "{msg}");
        // A file that is not a lock is not overwritten.
        std::fs::write(dir.join(LOCK_FILE), b"junk").unwrap();
        let msg = FolderLock::acquire(dir, "pretrain").unwrap_err().to_string();
        assert!(msg.contains("not a ctxalign lock file"), "{msg}");
    }

    #[test]
    fn times_print_in_utc() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_700_000_000), "2023-11-14 22:13:20 UTC");
    }
}
