//! Starting a plugin process without copying the runtime's address space.
//!
//! `std::process::Command` forks when it has work to do between fork and exec (ours: the
//! parent-death signal, limits, control group, capabilities), and a fork copies the page
//! tables of the whole runtime, which the exec then tears down again: 0.6 ms and 0.7 ms of a
//! ~4 ms cold start on this VM (BENCHMARKS.md, cold start). Here the child is made the way
//! glibc's `posix_spawn` makes it, `clone(CLONE_VM | CLONE_VFORK)`: it runs on a stack of its
//! own in the runtime's memory, with the runtime's thread suspended, until its `execve`.
//! It may therefore only make raw system calls on data prepared before the clone, and writes
//! nothing the parent reads except the error pipe.

use std::{
    ffi::{CString, OsStr},
    io,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
        unix::ffi::OsStrExt,
    },
    path::Path,
};

/// What the child does between the clone and the exec, besides wiring up its stdio.
pub(crate) type InChild<'a> = dyn Fn() -> io::Result<()> + Sync + 'a;

/// A started process: its id, a pidfd to wait on, and the read ends of its stdout and stderr.
#[derive(Debug)]
pub(crate) struct Spawned {
    pub(crate) pid: u32,
    pub(crate) pidfd: OwnedFd,
    pub(crate) stdout: OwnedFd,
    pub(crate) stderr: OwnedFd,
}

/// The program, its environment and working directory, as the child needs them: C strings
/// and pointer arrays built before the clone.
pub(crate) struct Program {
    path: CString,
    argv: Vec<*const libc::c_char>,
    /// Owns the strings `envp` points into.
    _env: Vec<CString>,
    envp: Vec<*const libc::c_char>,
    cwd: CString,
}

// SAFETY: the raw pointers point into `path` and `env`, owned by the same value and never
// changed after construction.
#[allow(unsafe_code)]
unsafe impl Send for Program {}
#[allow(unsafe_code)]
unsafe impl Sync for Program {}

fn c_string(text: &OsStr, what: &str) -> io::Result<CString> {
    CString::new(text.as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the plugin's {what} contains a NUL byte"),
        )
    })
}

impl Program {
    /// `path`, run with no arguments in `cwd` with exactly `env`.
    pub(crate) fn new<'a>(
        path: &Path,
        cwd: &Path,
        env: impl IntoIterator<Item = (&'a OsStr, &'a OsStr)>,
    ) -> io::Result<Self> {
        let path = c_string(path.as_os_str(), "path")?;
        let env = env
            .into_iter()
            .map(|(key, value)| {
                let mut pair = key.as_bytes().to_vec();
                pair.push(b'=');
                pair.extend_from_slice(value.as_bytes());
                c_string(OsStr::from_bytes(&pair), "environment")
            })
            .collect::<io::Result<Vec<_>>>()?;
        let mut program = Self {
            argv: Vec::new(),
            envp: env
                .iter()
                .map(|v| v.as_ptr())
                .chain([std::ptr::null()])
                .collect(),
            _env: env,
            cwd: c_string(cwd.as_os_str(), "working directory")?,
            path,
        };
        program.argv = vec![program.path.as_ptr(), std::ptr::null()];
        Ok(program)
    }
}

/// Everything the child reads, laid out before the clone.
struct Child<'a> {
    program: &'a Program,
    stdin: RawFd,
    stdout: RawFd,
    stderr: RawFd,
    errors: RawFd,
    in_child: &'a InChild<'a>,
}

/// A close-on-exec pipe (std's), as owned descriptors: read end, write end.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (read, write) = io::pipe()?;
    Ok((read.into(), write.into()))
}

/// Bytes of the child's stack: it calls a handful of libc wrappers, nothing deep.
const CHILD_STACK: usize = 64 * 1024;

/// Starts `program` in a process group of its own, stdin from `/dev/null`, stdout and stderr
/// to pipes, running `in_child` right before the exec; returns once the exec succeeded (or
/// with the error that stopped the child, which is then reaped).
#[allow(unsafe_code)]
pub(crate) fn spawn(program: &Program, in_child: &InChild<'_>) -> io::Result<Spawned> {
    let stdin = OwnedFd::from(
        std::fs::File::open("/dev/null")
            .map_err(|e| io::Error::new(e.kind(), format!("opening /dev/null: {e}")))?,
    );
    let (stdout_read, stdout_write) = pipe()?;
    let (stderr_read, stderr_write) = pipe()?;
    let (errors_read, errors_write) = pipe()?;
    let child = Child {
        program,
        stdin: stdin.as_raw_fd(),
        stdout: stdout_write.as_raw_fd(),
        stderr: stderr_write.as_raw_fd(),
        errors: errors_write.as_raw_fd(),
        in_child,
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // SAFETY: the stack grows down on every Linux target this builds for; the top is aligned
    // to 16 bytes as the ABI wants. All signals are blocked around the clone, so none runs a
    // runtime handler in the child before it resets them; the mask is restored in both.
    let pid = unsafe {
        let top = stack.as_mut_ptr().add(CHILD_STACK);
        let top = top.sub(top as usize % 16);
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut previous);
        let pid = libc::clone(
            run_child,
            top.cast(),
            libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
            std::ptr::addr_of!(child).cast_mut().cast(),
        );
        let error = io::Error::last_os_error();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        if pid < 0 {
            return Err(error);
        }
        pid
    };
    drop(stack);
    drop((stdin, stdout_write, stderr_write, errors_write));
    // The child has exec'd (the pipe closed with nothing in it) or written why it could not.
    let mut errno = [0u8; 4];
    let mut errors = std::fs::File::from(errors_read);
    let read = io::Read::read(&mut errors, &mut errno).unwrap_or(0);
    if read == errno.len() {
        // SAFETY: reaping the child that just failed; nothing else waits for it.
        unsafe {
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(io::Error::from_raw_os_error(i32::from_ne_bytes(errno)));
    }
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor we then own.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        let error = io::Error::last_os_error();
        // SAFETY: as above: stop and reap the child we cannot watch.
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        return Err(io::Error::new(
            error.kind(),
            format!("watching the plugin process (pidfd_open needs Linux 5.3 or later): {error}"),
        ));
    }
    Ok(Spawned {
        pid: pid as u32,
        // SAFETY: a fresh descriptor from pidfd_open, owned once.
        pidfd: unsafe { OwnedFd::from_raw_fd(pidfd as RawFd) },
        stdout: stdout_read,
        stderr: stderr_read,
    })
}

/// The child, between clone and exec: raw system calls on prepared data only.
#[allow(unsafe_code)]
extern "C" fn run_child(argument: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `argument` is the `Child` on the parent's stack, alive and unchanged while the
    // parent is suspended in clone(CLONE_VFORK).
    let child = unsafe { &*(argument as *const Child<'_>) };
    let error = match prepare(child) {
        // SAFETY: execve with NUL-terminated strings and NULL-terminated arrays.
        Ok(()) => unsafe {
            libc::execve(
                child.program.path.as_ptr(),
                child.program.argv.as_ptr(),
                child.program.envp.as_ptr(),
            );
            io::Error::last_os_error()
        },
        Err(error) => error,
    };
    let errno = error.raw_os_error().unwrap_or(libc::EINVAL).to_ne_bytes();
    // SAFETY: a write of a local buffer to the error pipe, then _exit, which runs nothing of
    // the parent's (no atexit handlers, no stdio flush).
    unsafe {
        libc::write(child.errors, errno.as_ptr().cast(), errno.len());
        libc::_exit(127)
    }
}

#[allow(unsafe_code)]
fn prepare(child: &Child<'_>) -> io::Result<()> {
    let check = |result: libc::c_int| {
        if result < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: sigaction, sigprocmask, dup2, setpgid and chdir on integers, local structs and
    // a NUL-terminated path prepared before the clone.
    unsafe {
        // The runtime's handlers live in its memory and must not run here or survive the
        // exec's reset; ignored signals stay ignored (as across any exec), except SIGPIPE,
        // which Rust's runtime ignores for itself and std's spawn restores.
        let mut default: libc::sigaction = std::mem::zeroed();
        default.sa_sigaction = libc::SIG_DFL;
        for signal in 1..=libc::SIGRTMAX() {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue;
            }
            let mut current: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(signal, std::ptr::null(), &mut current) != 0 {
                continue;
            }
            if current.sa_sigaction != libc::SIG_IGN || signal == libc::SIGPIPE {
                libc::sigaction(signal, &default, std::ptr::null_mut());
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for (from, to) in [(child.stdin, 0), (child.stdout, 1), (child.stderr, 2)] {
            check(libc::dup2(from, to))?;
        }
        check(libc::setpgid(0, 0))?;
        check(libc::chdir(child.program.cwd.as_ptr()))?;
    }
    (child.in_child)()
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn program(path: &str, env: &[(&str, &str)]) -> Program {
        Program::new(
            Path::new(path),
            Path::new("/"),
            env.iter().map(|(k, v)| (OsStr::new(*k), OsStr::new(*v))),
        )
        .unwrap()
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut text = String::new();
        std::fs::File::from(fd).read_to_string(&mut text).unwrap();
        text
    }

    fn reap(spawned: &Spawned) -> i32 {
        let mut status = 0;
        // SAFETY: waiting for our own child into a local.
        #[allow(unsafe_code)]
        unsafe {
            assert_eq!(
                libc::waitpid(spawned.pid as libc::pid_t, &mut status, 0),
                spawned.pid as libc::pid_t
            );
        }
        status
    }

    #[test]
    fn the_child_gets_exactly_its_environment_its_directory_and_a_group_of_its_own() {
        let spawned = spawn(
            &program("/usr/bin/env", &[("ONLY", "this"), ("AND", "that")]),
            &|| Ok(()),
        )
        .unwrap();
        let stdout = read_all(spawned.stdout.try_clone().unwrap());
        let mut lines: Vec<&str> = stdout.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["AND=that", "ONLY=this"]);
        assert_eq!(read_all(spawned.stderr.try_clone().unwrap()), "");
        // SAFETY: getpgid on the (exited, not yet reaped) child.
        #[allow(unsafe_code)]
        let group = unsafe { libc::getpgid(spawned.pid as libc::pid_t) };
        assert_eq!(
            group, spawned.pid as libc::pid_t,
            "leads its own process group"
        );
        assert_eq!(reap(&spawned), 0, "exited 0");
    }

    #[test]
    fn an_exec_that_fails_is_the_starts_error() {
        let error = spawn(&program("/nonexistent/plugin", &[]), &|| Ok(())).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn an_error_before_the_exec_stops_the_start_with_that_error() {
        let error = spawn(&program("/usr/bin/env", &[]), &|| {
            Err(io::Error::from_raw_os_error(libc::EPERM))
        })
        .unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EPERM));
    }
}
