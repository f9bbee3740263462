//! What `aperture demo` ([`crate::demo`]) and `aperture bench` ([`crate::bench_guest`]) share
//! to run the real guest: the provisioning scripts and their cache, disk images, and
//! booting Linux under QEMU TCG while reading the markers its init prints on the
//! serial console.

use md5::{Digest, Md5};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Guest RAM in MiB.
pub(crate) const RAM_MIB: u32 = 512;

/// The guest memory layout of the demo and the bench: [`RAM_MIB`] with no reserved
/// memory.
pub(crate) fn ram_layout() -> Result<mem_layout::Layout, String> {
    device_host::host::plain_layout(RAM_MIB).map_err(|e| format!("guest memory layout: {e}"))
}

/// The repository the binary was built from: the demo and the bench run from a clone.
pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `scripts/NAME`, all its output going to our stderr: our stdout carries only
/// the report (text or JSON).
///
/// # Errors
/// A sentence naming the script when it cannot start or fails.
pub(crate) fn script(name: &str, args: &[&str]) -> Result<(), String> {
    let path = repo().join("scripts").join(name);
    let status = Command::new("bash")
        .arg(&path)
        .args(args)
        .stdout(Stdio::from(std::io::stderr()))
        .stderr(Stdio::inherit())
        .status()
        .map_err(|e| format!("cannot run {}: {e}", path.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{} {} failed ({status})",
            path.display(),
            args.join(" ")
        ))
    }
}

/// The provisioning cache: `$APERTURE_CACHE`, else `~/.cache/aperture`.
pub(crate) fn cache_dir() -> PathBuf {
    std::env::var("APERTURE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(&std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
                .join(".cache/aperture")
        })
}

/// `KEY=VALUE` lines of the provisioning cache's env file.
///
/// # Errors
/// The file cannot be read.
fn cache_env() -> Result<BTreeMap<String, String>, String> {
    let path = cache_dir().join("env");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

/// What `scripts/provision.sh` installed, by exactly the versions it resolved, so that
/// every report names what ran.
pub(crate) struct Stack {
    /// The QEMU wrapper to run.
    pub qemu: String,
    /// The PVH-bootable guest kernel.
    pub kernel: String,
    /// QEMU's own version number (`qemu-system-x86_64 --version`).
    pub qemu_version: String,
    /// The Debian package and version of QEMU (`qemu-system-x86=1:11.1.3+ds-2~bpo13+1`).
    pub qemu_deb: String,
    /// The guest kernel's release (`uname -r`).
    pub kernel_release: String,
    /// The Debian package and version of the guest kernel.
    pub kernel_deb: String,
}

/// Runs `scripts/provision.sh` (cached after the first run; it re-reads the archive's
/// package indexes and rebuilds what another version replaced) and reads what it
/// installed.
///
/// # Errors
/// Provisioning failed, or left its env file incomplete.
pub(crate) fn provision() -> Result<Stack, String> {
    script("provision.sh", &[]).map_err(|e| format!("provisioning failed: {e}"))?;
    let env = cache_env()?;
    let key = |k: &str| {
        env.get(k)
            .cloned()
            .ok_or(format!("provisioning left no {k} in its env file"))
    };
    Ok(Stack {
        qemu: key("APERTURE_QEMU")?,
        kernel: key("APERTURE_KERNEL_PVH")?,
        qemu_version: key("APERTURE_QEMU_VERSION")?,
        qemu_deb: key("APERTURE_QEMU_DEB")?,
        kernel_release: key("APERTURE_KERNEL_RELEASE")?,
        kernel_deb: key("APERTURE_KERNEL_DEB")?,
    })
}

/// Host CPU seconds: this process (which serves our devices when they run in process)
/// and its descendants (QEMU, and a back-end process when there is one).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct CpuTimes {
    pub ours_s: f64,
    pub children_s: f64,
}

impl CpuTimes {
    /// Both so far.
    pub(crate) fn now() -> Option<Self> {
        let tck = clock_ticks();
        let me = std::process::id();
        let (_, own) = proc_stat(me)?;
        let children: u64 = descendants(me)
            .into_iter()
            .filter_map(proc_stat)
            .map(|(_, t)| t)
            .sum();
        Some(Self {
            ours_s: own as f64 / tck,
            children_s: children as f64 / tck,
        })
    }

    /// What was used since `before`.
    pub(crate) fn since(self, before: Self) -> Self {
        Self {
            ours_s: (self.ours_s - before.ours_s).max(0.0),
            children_s: (self.children_s - before.children_s).max(0.0),
        }
    }
}

/// Clock ticks per second of the `/proc` CPU counters.
pub(crate) fn clock_ticks() -> f64 {
    // SAFETY: sysconf(3) takes no pointers.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// `(ppid, utime + stime in ticks)` of `/proc/PID/stat`.
pub(crate) fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields restart after it.
    let rest = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // proc(5): state is field 3, ppid 4, utime 14, stime 15.
    let ppid = f.get(1)?.parse().ok()?;
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((ppid, utime + stime))
}

/// The living descendants of `pid`.
pub(crate) fn descendants(pid: u32) -> Vec<u32> {
    let procs: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| proc_stat(p).map(|(ppid, _)| (p, ppid)))
                .collect()
        })
        .unwrap_or_default();
    let mut found = vec![pid];
    let mut i = 0;
    while let Some(&parent) = found.get(i) {
        found.extend(procs.iter().filter(|p| p.1 == parent).map(|p| p.0));
        i += 1;
    }
    found.remove(0);
    found
}

/// A disk of `size_mib` MiB whose first `data_mib` MiB are deterministic host data
/// (the rest zeros). Returns the md5 of the data.
///
/// # Errors
/// The file cannot be written.
pub(crate) fn make_disk(path: &Path, data_mib: u32, size_mib: u32) -> Result<String, String> {
    let err = |e: std::io::Error| format!("cannot write {}: {e}", path.display());
    let mut f = std::fs::File::create(path).map_err(err)?;
    let mut md5 = Md5::new();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..data_mib {
        for w in chunk.chunks_exact_mut(8) {
            // xorshift64: cheap, deterministic, not compressible.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        md5.update(&chunk);
        f.write_all(&chunk).map_err(err)?;
    }
    f.set_len(u64::from(size_mib) << 20).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(hex(&md5.finalize()))
}

/// Lower-case hex of `b`.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The QEMU arguments every guest boot starts with: no defaults, serial console on
/// stdio, q35 under TCG with one vCPU, the kernel, `initrd` and `append`. Memory and
/// devices come after.
pub(crate) fn base_args(kernel: &str, initrd: &Path, append: &str) -> Vec<String> {
    machine_args(&["-machine", "q35"], kernel, initrd, append)
}

/// [`base_args`] for another machine: `machine` names it (and its CPU, if it needs one).
pub(crate) fn machine_args(
    machine: &[&str],
    kernel: &str,
    initrd: &Path,
    append: &str,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ]
    .iter()
    .chain(machine)
    .chain(&["-accel", "tcg", "-smp", "1", "-kernel", kernel])
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "-initrd".to_string(),
        initrd.to_string_lossy().into_owned(),
        "-append".to_string(),
        append.to_string(),
    ]);
    args
}

/// What one guest boot left.
pub(crate) struct Boot {
    /// Marker values by key, in console order: a line `PREFIX KEY VALUE...` adds
    /// `VALUE...` under `KEY`.
    pub(crate) markers: BTreeMap<String, Vec<String>>,
    /// How QEMU ended.
    pub(crate) status: ExitStatus,
    /// From QEMU's start to its exit.
    pub(crate) wall: Duration,
}

impl Boot {
    /// The first value of `key`, or "" if the guest never printed it.
    pub(crate) fn first(&self, key: &str) -> String {
        self.markers
            .get(key)
            .and_then(|v| v.first())
            .cloned()
            .unwrap_or_default()
    }
}

/// Boots QEMU with `args`, writes its console to `console_path`, and collects the lines
/// that start with `prefix` (and a space) as markers. `on_marker(key, value, elapsed)`
/// runs as each arrives, while the guest still runs. QEMU is killed if it has not
/// exited after `timeout`.
///
/// # Errors
/// QEMU cannot start or be waited for, or the console file cannot be created.
pub(crate) fn boot(
    qemu: &str,
    args: &[String],
    console_path: &Path,
    prefix: &str,
    timeout: Duration,
    mut on_marker: impl FnMut(&str, &str, Duration),
) -> Result<Boot, String> {
    let mut console = std::fs::File::create(console_path)
        .map_err(|e| format!("cannot create {}: {e}", console_path.display()))?;
    let t0 = Instant::now();
    let mut child = Command::new(qemu)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {qemu}: {e}"))?;
    let stdout = child.stdout.take().ok_or("QEMU has no stdout")?;
    // Kill QEMU if the guest hangs; told to stand down once QEMU has exited.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let pid = child.id();
    let watchdog = std::thread::spawn(move || {
        if done_rx.recv_timeout(timeout).is_err() {
            // SAFETY: kill(2) takes no pointers; `pid` is our child, not yet reaped
            // (we reap it only after this thread is told to stand down or fires).
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    });
    let mut markers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let prefix = format!("{prefix} ");
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let line = line.trim_end_matches('\r');
        let _ = writeln!(console, "{line}");
        if let Some(rest) = line.strip_prefix(&prefix) {
            let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
            on_marker(k, v, t0.elapsed());
            markers
                .entry(k.to_string())
                .or_default()
                .push(v.to_string());
        }
    }
    let status = child.wait();
    let _ = done_tx.send(());
    let _ = watchdog.join();
    let status = status.map_err(|e| e.to_string())?;
    Ok(Boot {
        markers,
        status,
        wall: t0.elapsed(),
    })
}
