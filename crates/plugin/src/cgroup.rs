//! A control group per plugin process, where the runtime may make them: resident memory is
//! limited (what `memoryMb` means; `RLIMIT_AS` limits address space, which Go reserves by the
//! gigabyte), and everything the plugin starts, `setsid` daemons included, is in the group
//! and dies with it.
//!
//! Works with cgroup v2 (the memory controller enabled for our subtree) and with v1's memory
//! hierarchy (hybrid machines mount both). One hierarchy is enough: it both limits and lists
//! every process of the group. Joining costs a kernel RCU grace period (10-15 ms measured on
//! this v1 VM, more than a whole cold start), which is why it is one hierarchy and not two, and
//! why only a process with a memory limit joins before its exec (nothing it does escapes
//! the limit); one without is moved in by the host from another thread while it starts, so its
//! start does not wait (a daemon it forked in those first milliseconds would escape). Written here rather than with `cgroups-rs`:
//! its current release pulls in a D-Bus stack for systemd, and the older one creates groups
//! in every v1 hierarchy (cpuset ones reject tasks until configured), cannot nest a subset of
//! controllers under the runtime's own groups, and joins processes only after they run.

use std::{
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

/// Where this runtime can make control groups, found once.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    /// The runtime's own group in the hierarchy with the memory controller.
    dir: PathBuf,
    v2: bool,
}

impl CgroupRoot {
    /// The runtime's own groups, if child groups with a memory controller can be made there;
    /// `Err` says why not (for the warning that memory limits fall back to `RLIMIT_AS`).
    pub fn detect() -> Result<Self, String> {
        let own = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|e| format!("reading /proc/self/cgroup: {e}"))?;
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("reading /proc/self/mountinfo: {e}"))?;
        let root = Self::v1(&own, &mounts).or_else(|| Self::v2(&own, &mounts));
        let root = root.ok_or("no cgroup hierarchy with a memory controller is mounted")?;
        // Proof by doing: a group we cannot make is no use.
        let probe = root.create(&format!("mycelium-probe-{}", std::process::id()), None);
        match probe {
            Ok(group) => {
                drop(group);
                root.sweep();
                Ok(root)
            }
            Err(error) => Err(format!(
                "cannot create control groups under {}: {error}",
                root.dir.display()
            )),
        }
    }

    fn v1(own: &str, mounts: &str) -> Option<Self> {
        let is_memory = |list: &str| list.split(',').any(|c| c == "memory");
        let path = own.lines().find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
            is_memory(controllers).then_some(path)
        })?;
        let (mount_root, mount_point) = mount_of(mounts, |fstype, options| {
            fstype == "cgroup" && is_memory(options)
        })?;
        Some(Self {
            dir: join(&mount_point, &mount_root, path),
            v2: false,
        })
    }

    fn v2(own: &str, mounts: &str) -> Option<Self> {
        let path = own.lines().find_map(|line| line.strip_prefix("0::"))?;
        let (mount_root, mount_point) = mount_of(mounts, |fstype, _| fstype == "cgroup2")?;
        let dir = join(&mount_point, &mount_root, path);
        let enabled = std::fs::read_to_string(dir.join("cgroup.subtree_control")).ok()?;
        enabled
            .split_whitespace()
            .any(|c| c == "memory")
            .then_some(Self { dir, v2: true })
    }

    /// Removes the groups of runtimes that are gone (SIGKILLed ones leave theirs behind),
    /// killing what still runs in them: daemons their plugins started in sessions of their
    /// own outlive a SIGKILLed runtime, and end here. Groups are named
    /// `mycelium-<function>-v<version>-<runtime pid>-<n>`; those of live runtimes are left.
    fn sweep(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(owner) = name
                .to_str()
                .filter(|name| name.starts_with("mycelium-"))
                .and_then(|name| name.rsplit('-').nth(1))
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            if Path::new(&format!("/proc/{owner}")).exists() {
                continue;
            }
            tracing::info!(group = %entry.path().display(), "removing the control group of a runtime that is gone");
            drop(ProcessCgroup {
                dir: entry.path(),
                v2: self.v2,
            });
        }
    }

    /// Makes the group `name` with a memory limit (bytes of resident memory, swap included).
    pub fn create(&self, name: &str, memory: Option<u64>) -> std::io::Result<ProcessCgroup> {
        let dir = self.dir.join(name);
        std::fs::create_dir(&dir)?;
        // From here on, dropping the group removes the directory again.
        let group = ProcessCgroup { dir, v2: self.v2 };
        if let Some(bytes) = memory {
            let memory_dir = &group.dir;
            let bytes = bytes.to_string();
            if self.v2 {
                std::fs::write(memory_dir.join("memory.max"), &bytes)?;
                // Best effort: without swap accounting there is no such file.
                let _ = std::fs::write(memory_dir.join("memory.swap.max"), "0");
            } else {
                std::fs::write(memory_dir.join("memory.limit_in_bytes"), &bytes)?;
                let _ = std::fs::write(memory_dir.join("memory.memsw.limit_in_bytes"), &bytes);
            }
        }
        Ok(group)
    }
}

/// The mount (its root within the hierarchy, and where it is mounted) of the first cgroup
/// filesystem `wanted` accepts, from `/proc/self/mountinfo`.
fn mount_of(mounts: &str, wanted: impl Fn(&str, &str) -> bool) -> Option<(String, PathBuf)> {
    mounts.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mut fields = before.split(' ');
        let (root, point) = (fields.nth(3)?, fields.next()?);
        let mut after = after.split(' ');
        let (fstype, options) = (after.next()?, after.nth(1)?);
        wanted(fstype, options).then(|| (root.to_owned(), PathBuf::from(point)))
    })
}

/// A group's directory: the mount point plus the group's path below the mount's root.
fn join(mount_point: &Path, mount_root: &str, path: &str) -> PathBuf {
    let below = path
        .strip_prefix(mount_root)
        .unwrap_or(path)
        .trim_start_matches('/');
    mount_point.join(below)
}

/// One plugin process's control group. Dropping it kills whatever is still in it and removes it.
#[derive(Debug)]
pub struct ProcessCgroup {
    dir: PathBuf,
    v2: bool,
}

impl ProcessCgroup {
    /// The group's `cgroup.procs`: writing a pid there moves that process in.
    pub(crate) fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// [`Self::procs_file`] for a child to write `0` to (itself) before its exec.
    pub(crate) fn join_file(&self) -> Option<CString> {
        CString::new(self.procs_file().as_os_str().as_bytes()).ok()
    }

    /// Kills every process in the group, `setsid` daemons included.
    pub fn kill_all(&self) {
        if self.v2 && std::fs::write(self.dir.join("cgroup.kill"), "1").is_ok() {
            return;
        }
        // v1 (or v2 before 5.14): kill what is listed until nothing is; a fork in between shows
        // up in the next read.
        let procs = self.procs_file();
        for _ in 0..100 {
            let Ok(text) = std::fs::read_to_string(&procs) else {
                return;
            };
            let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            if pids.is_empty() {
                return;
            }
            for pid in pids {
                kill(pid);
            }
        }
    }
}

impl Drop for ProcessCgroup {
    fn drop(&mut self) {
        self.kill_all();
        let dir = std::mem::take(&mut self.dir);
        // A group can be removed once its killed processes have exited, usually within a few
        // milliseconds: waited for here, so a runtime that exits right after leaves nothing.
        // Anything slower is left to a thread rather than the caller.
        if remove_dir(&dir, 50, 2) {
            return;
        }
        std::thread::spawn(move || remove_dir(&dir, 500, 10));
    }
}

/// Removes `dir`, trying `tries` times `pause_ms` apart; whether it is gone.
fn remove_dir(dir: &Path, tries: u32, pause_ms: u64) -> bool {
    for _ in 0..tries {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(pause_ms));
    }
    false
}

#[allow(unsafe_code)]
fn kill(pid: i32) {
    if pid > 0 {
        // SAFETY: kill(2) has no memory-safety preconditions; the pid comes from the group's
        // own list, whose members we are ending.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}

/// Joins the group whose `cgroup.procs` path is given: writes `0` (the writer) to it.
/// Runs in the child before exec (see `spawn`): only raw system calls, no allocation.
#[allow(unsafe_code)]
pub(crate) fn join_in_child(file: Option<&CString>) -> std::io::Result<()> {
    if let Some(file) = file {
        // SAFETY: open/write/close on a NUL-terminated path we own and a one-byte buffer.
        unsafe {
            let fd = libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let written = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if written != 1 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw";

    #[test]
    fn finds_v1_memory_of_a_hybrid_machine() {
        let own = "8:pids:/\n4:memory:/process_api/abc\n0::/\n";
        let root = CgroupRoot::v1(own, MOUNTS).unwrap();
        assert_eq!(
            root.dir,
            PathBuf::from("/sys/fs/cgroup/memory/process_api/abc")
        );
        assert!(!root.v2);
        // No v2 memory controller delegated there: the unified mount is not used.
        assert!(CgroupRoot::v2(own, MOUNTS).is_none());
    }

    /// Needs a machine where groups can be made (root); elsewhere there is nothing to sweep.
    #[test]
    fn groups_of_runtimes_that_are_gone_are_swept() {
        let Ok(root) = CgroupRoot::detect() else {
            eprintln!("SKIPPED: no control groups here");
            return;
        };
        // A runtime pid that cannot exist (above the kernel's limit of 2^22).
        let leftover = root
            .create("mycelium-ghost-v1-4194305-0", Some(64 << 20))
            .unwrap();
        let dir = leftover.dir.clone();
        std::mem::forget(leftover);
        let mine = root
            .create(&format!("mycelium-alive-v1-{}-0", std::process::id()), None)
            .unwrap();
        assert!(dir.exists());
        CgroupRoot::detect().unwrap();
        assert!(!dir.exists(), "the dead runtime's group was removed");
        assert!(mine.dir.exists(), "a live runtime's group is left");
    }

    #[test]
    fn mount_roots_are_stripped() {
        assert_eq!(
            join(
                Path::new("/sys/fs/cgroup"),
                "/kubepods/x",
                "/kubepods/x/app"
            ),
            PathBuf::from("/sys/fs/cgroup/app")
        );
        assert_eq!(
            join(Path::new("/sys/fs/cgroup"), "/", "/a/b"),
            PathBuf::from("/sys/fs/cgroup/a/b")
        );
    }
}
