//! What the guest needs that the host builds: the static `diskbench` workload, and
//! timestamps.

use super::say;
use crate::vm;
use md5::{Digest, Md5};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{SystemTime, UNIX_EPOCH};

/// Builds `scripts/guest/diskbench.c` with `gcc -static -O2` into the cache, once per
/// source version (the file name carries a hash of the source).
///
/// # Errors
/// gcc is missing or fails, or glibc's static library is missing and cannot be
/// installed.
pub(super) fn build_diskbench() -> Result<PathBuf, String> {
    let src = vm::repo().join("scripts/guest/diskbench.c");
    let text = std::fs::read(&src).map_err(|e| format!("cannot read {}: {e}", src.display()))?;
    let hash = vm::hex(&Md5::digest(&text));
    let tools = vm::cache_dir().join("tools");
    let out = tools.join(format!("diskbench-{}", &hash[..12]));
    if out.is_file() {
        return Ok(out);
    }
    ensure_static_libc()?;
    std::fs::create_dir_all(&tools)
        .map_err(|e| format!("cannot create {}: {e}", tools.display()))?;
    let tmp = tools.join(format!(".diskbench.{}", std::process::id()));
    say(&format!("building {} (gcc -static -O2)", src.display()));
    let status = Command::new("gcc")
        .args(["-static", "-O2", "-Wall", "-o"])
        .arg(&tmp)
        .arg(&src)
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| format!("cannot run gcc ({e}); install it: apt-get install gcc"))?;
    if !status.success() {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!(
            "gcc -static failed on {} ({status})",
            src.display()
        ));
    }
    std::fs::rename(&tmp, &out).map_err(|e| format!("cannot move it to {}: {e}", out.display()))?;
    Ok(out)
}

/// Whether gcc finds glibc's static `libc.a`.
pub(super) fn have_static_libc() -> Result<bool, String> {
    let o = Command::new("gcc")
        .arg("-print-file-name=libc.a")
        .output()
        .map_err(|e| format!("cannot run gcc ({e}); install it: apt-get install gcc"))?;
    let path = String::from_utf8_lossy(&o.stdout).trim().to_string();
    // gcc echoes the bare name when it finds no such file.
    Ok(o.status.success() && Path::new(&path).is_absolute() && Path::new(&path).is_file())
}

/// Installs libc6-dev with apt when glibc's static library is missing.
pub(super) fn ensure_static_libc() -> Result<(), String> {
    if have_static_libc()? {
        return Ok(());
    }
    say("glibc's static libc.a is missing; installing libc6-dev with apt-get");
    let status = Command::new("apt-get")
        .args(["install", "-y", "--no-install-recommends", "libc6-dev"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .map_err(|e| format!("cannot run apt-get ({e}); install libc6-dev yourself"))?;
    if !status.success() || !have_static_libc()? {
        return Err(format!(
            "apt-get install libc6-dev failed ({status}) and gcc still finds no libc.a; \
             install libc6-dev (as root) and run again"
        ));
    }
    Ok(())
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
pub(super) fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    rfc3339(secs)
}

/// `secs` after the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ` (proleptic Gregorian, UTC):
/// Howard Hinnant's `civil_from_days`.
pub(super) fn rfc3339(secs: u64) -> String {
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    )
}
