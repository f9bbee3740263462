//! `aperture backend blk|rng` as a child process: the out-of-process back-ends of
//! `aperture bench --guest` and of `aperture demo --inflight copy`.

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// `aperture backend ARGS --once` in a child process, its socket, stats and log in one
/// directory.
pub(crate) struct BackendProcess {
    child: std::process::Child,
    /// What it serves, for messages (`aperture backend blk`).
    what: String,
    pub(crate) socket: PathBuf,
    stats: PathBuf,
    log: PathBuf,
}

impl BackendProcess {
    /// Starts `aperture backend ARGS` (this executable) with `--once` and its socket
    /// (`NAME.sock`), stats (`NAME-stats.json`) and log (`NAME.log`) in `dir`, and waits
    /// until it listens. `args` start with the device (`blk`, `rng`).
    ///
    /// # Errors
    /// The process cannot be started, or exits or does not listen within 10 s.
    pub(crate) fn spawn(dir: &Path, name: &str, args: &[&OsStr]) -> Result<Self, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this executable to run `aperture backend`: {e}"))?;
        // Rebuilt while the bench runs (`cargo build` replaces the file): Linux names the
        // old file "PATH (deleted)"; the new build at PATH runs the same back-end.
        let exe = match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(p) if !exe.exists() => PathBuf::from(p),
            _ => exe,
        };
        let what = format!(
            "`aperture backend {}`",
            args.first().map_or("".into(), |a| a.to_string_lossy())
        );
        let socket = dir.join(format!("{name}.sock"));
        let stats = dir.join(format!("{name}-stats.json"));
        let log = dir.join(format!("{name}.log"));
        let _ = std::fs::remove_file(&stats);
        let err =
            File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = Command::new(exe)
            .arg("backend")
            .args(args)
            .arg("--once")
            .arg("--socket")
            .arg(&socket)
            .arg("--stats")
            .arg(&stats)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {what}: {e}"))?;
        let mut b = Self {
            child,
            what,
            socket,
            stats,
            log,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::metadata(&b.socket).is_ok_and(|m| m.file_type().is_socket()) {
            let exited = b.child.try_wait().ok().flatten();
            if exited.is_some() || std::time::Instant::now() > deadline {
                return Err(format!(
                    "{} did not listen on {} ({}); its log: {}",
                    b.what,
                    b.socket.display(),
                    exited.map_or("10 s passed".to_string(), |s| s.to_string()),
                    b.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(b)
    }

    /// Waits (10 s at most) for it to exit after the front-end disconnected and reads
    /// its `--stats` JSON.
    ///
    /// # Errors
    /// It does not exit, exits with an error, leaves no readable stats, or did not run
    /// in `mode` (`iotlb` behind the virtio-iommu, `plain` with implicit grants: its
    /// memory is then only the device host's shadows).
    pub(crate) fn finish(mut self, mode: &str) -> Result<serde_json::Value, String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    return Err(format!(
                        "{} did not exit 10 s after the front-end disconnected (log: {})",
                        self.what,
                        self.log.display()
                    ))
                }
            }
        };
        if !status.success() {
            return Err(format!(
                "{} exited with {status} (log: {})",
                self.what,
                self.log.display()
            ));
        }
        let text = std::fs::read_to_string(&self.stats)
            .map_err(|e| format!("no back-end stats at {}: {e}", self.stats.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("back-end stats {}: {e}", self.stats.display()))?;
        if v["mode"] != mode {
            return Err(format!(
                "the back-end ran in mode {}, not {mode} (stats {})",
                v["mode"],
                self.stats.display()
            ));
        }
        Ok(v)
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        // Not waited for by `finish` (an error on the way): do not leave it running.
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
