//! Running one `#[ignore]`d test of the current test binary in a process of its own, with
//! environment variables and an address-space limit set before its allocator starts. Shared by
//! the root crate's and the allocator crate's tests (included with `#[path]`).

use std::os::unix::process::CommandExt;
use std::process::Command;

/// Runs the ignored test `name` of this binary in a new process, with `env` set and, if
/// given, an address-space limit of `limit_kib` KiB (as `ulimit -v` would). Returns whether it
/// passed and its output.
pub(crate) fn run_child(
    name: &str,
    env: &[(&str, &str)],
    limit_kib: Option<u64>,
) -> (bool, String) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        name,
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(kib) = limit_kib {
        // SAFETY: between fork and exec the closure only calls setrlimit, which is
        // async-signal-safe, on a stack value.
        unsafe {
            cmd.pre_exec(move || {
                let lim = libc::rlimit {
                    rlim_cur: kib * 1024,
                    rlim_max: kib * 1024,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
