//! `aperture backend blk` as the bench's out-of-process back-end: a child process.

use std::fs::File;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// `aperture backend blk` serving the bench's image read-only, a child process.
pub(super) struct BackendProcess {
    pub(super) child: std::process::Child,
    pub(super) socket: PathBuf,
    pub(super) stats: PathBuf,
    pub(super) log: PathBuf,
}

impl BackendProcess {
    /// Starts it (this executable) in `dir` and waits until it listens.
    ///
    /// # Errors
    /// The process cannot be started, or exits or does not listen within 10 s.
    pub(super) fn spawn(dir: &Path, disk: &Path, poll: Duration) -> Result<Self, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find this executable to run `aperture backend`: {e}"))?;
        // Rebuilt while the bench runs (`cargo build` replaces the file): Linux names the
        // old file "PATH (deleted)"; the new build at PATH runs the same back-end.
        let exe = match exe.to_str().and_then(|p| p.strip_suffix(" (deleted)")) {
            Some(p) if !exe.exists() => PathBuf::from(p),
            _ => exe,
        };
        let socket = dir.join("blk.sock");
        let stats = dir.join("backend-stats.json");
        let log = dir.join("backend.log");
        let _ = std::fs::remove_file(&stats);
        let err =
            File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
        let child = Command::new(exe)
            .args(["backend", "blk", "--read-only", "--once"])
            .arg("--poll-us")
            .arg(poll.as_micros().to_string())
            .arg("--socket")
            .arg(&socket)
            .arg("--disk")
            .arg(disk)
            .arg("--stats")
            .arg(&stats)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start `aperture backend blk`: {e}"))?;
        let mut b = Self {
            child,
            socket,
            stats,
            log,
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !std::fs::metadata(&b.socket).is_ok_and(|m| m.file_type().is_socket()) {
            let exited = b.child.try_wait().ok().flatten();
            if exited.is_some() || std::time::Instant::now() > deadline {
                return Err(format!(
                    "`aperture backend blk` did not listen on {} ({}); its log: {}",
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
    pub(super) fn finish(mut self, mode: &str) -> Result<serde_json::Value, String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => {
                    return Err(format!(
                        "`aperture backend blk` did not exit 10 s after the front-end disconnected (log: {})",
                        self.log.display()
                    ))
                }
            }
        };
        if !status.success() {
            return Err(format!(
                "`aperture backend blk` exited with {status} (log: {})",
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
