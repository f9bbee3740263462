//! Tests of provisioning's version resolver (`scripts/resolve.sh`) against package
//! indexes committed as fixtures (`scripts/tests/fixtures`): backports suites keep only
//! the newest revision of a package, so provisioning picks versions by policy (the
//! newest build of a pinned series) and must say, in one line, when nothing fits.
#![allow(clippy::unwrap_used)] // a test that cannot proceed fails by panicking

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn scripts() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts")
}

fn fixture(name: &str) -> String {
    let path = scripts().join("tests/fixtures").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// What one run of the resolver gave: exit code, stdout, stderr.
struct Resolved {
    code: Option<i32>,
    out: String,
    err: String,
}

impl Resolved {
    /// The one pick on stdout, after checking the run succeeded.
    fn picked(&self) -> &str {
        assert_eq!(self.code, Some(0), "stderr:\n{}", self.err);
        self.out.trim_end()
    }

    /// The one error line, after checking the run failed with nothing on stdout.
    fn error(&self) -> &str {
        assert_eq!(
            self.code,
            Some(1),
            "stdout:\n{}\nstderr:\n{}",
            self.out,
            self.err
        );
        assert!(
            self.out.is_empty(),
            "a failed resolution printed {:?}",
            self.out
        );
        let lines: Vec<&str> = self.err.lines().collect();
        assert_eq!(lines.len(), 1, "not one line: {:?}", self.err);
        assert!(lines[0].starts_with("[resolve.sh] ERROR: "), "{}", lines[0]);
        lines[0]
    }
}

/// Runs `scripts/resolve.sh ARGS` with `index` on stdin, with the environment cleared of
/// any `APERTURE_*` override so that only the arguments decide.
fn resolve(args: &[&str], index: &str) -> Resolved {
    let mut cmd = Command::new("bash");
    cmd.arg(scripts().join("resolve.sh")).args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("APERTURE_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("bash runs scripts/resolve.sh");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(index.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    Resolved {
        code: o.status.code(),
        out: String::from_utf8_lossy(&o.stdout).into_owned(),
        err: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

fn qemu(series: &str, index: &str) -> Resolved {
    resolve(&["qemu", "trixie-backports", series, "10.1"], index)
}

fn kernel(suite: &str, series: &str, index: &str) -> Resolved {
    resolve(&["kernel", suite, series, "cloud-amd64"], index)
}

/// The stanzas of `index` whose package name passes `keep`.
fn only(index: &str, keep: impl Fn(&str) -> bool) -> String {
    index
        .split("\n\n")
        .filter(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Package: "))
                .is_some_and(&keep)
        })
        .map(|s| format!("{}\n\n", s.trim_matches('\n')))
        .collect()
}

#[test]
fn qemu_follows_a_newer_debian_revision_of_the_pinned_series() {
    // The revision the old exact pin named, while the archive had it...
    let before = fixture("trixie-backports-2026-11.Packages");
    assert_eq!(qemu("11.1", &before).picked(), "1:11.1.3+ds-1~bpo13+1");
    // ...and the one that replaced it, with no change to versions.env.
    let after = fixture("trixie-backports-2026-12.Packages");
    let r = qemu("11.1", &after);
    assert_eq!(r.picked(), "1:11.1.3+ds-2~bpo13+1");
    assert!(
        r.err.contains("newest qemu-system-x86 of series 11.1"),
        "{}",
        r.err
    );
    // Both in one index (two mirrors, say): the newer revision wins.
    assert_eq!(
        qemu("11.1", &(before + &after)).picked(),
        "1:11.1.3+ds-2~bpo13+1"
    );
}

#[test]
fn qemu_refuses_a_newer_series_in_one_line_naming_the_variable() {
    let index = fixture("trixie-backports-newer-series.Packages");
    let r = qemu("11.1", &index);
    let line = r.error();
    assert!(line.contains("series 11.1"), "{line}");
    assert!(
        line.contains("1:11.2.0+ds-1~bpo13+1"),
        "names what is there: {line}"
    );
    assert!(
        line.contains("APERTURE_QEMU_SERIES"),
        "names the variable: {line}"
    );
    // Moving the series, as the line says, resolves.
    assert_eq!(qemu("11.2", &index).picked(), "1:11.2.0+ds-1~bpo13+1");
}

#[test]
fn qemu_series_below_the_vfio_user_floor_is_refused() {
    let index = fixture("trixie-backports-2026-12.Packages");
    let line = qemu("10.0", &index).error().to_string();
    assert!(line.contains("below the floor 10.1"), "{line}");
}

#[test]
fn qemu_series_matches_whole_components() {
    // 11.1 is not a prefix match: 11.10.0 is not of series 11.1.
    let index = fixture("trixie-backports-2026-11.Packages").replace("11.1.3", "11.10.0");
    let line = qemu("11.1", &index).error().to_string();
    assert!(line.contains("1:11.10.0+ds-1~bpo13+1"), "{line}");
}

#[test]
fn qemu_needs_a_qemu_system_data_of_the_same_version() {
    let line = qemu("11.1", &fixture("trixie-backports-data-lags.Packages"))
        .error()
        .to_string();
    assert!(line.contains("series 11.1"), "{line}");
}

#[test]
fn an_exact_qemu_version_is_taken_only_if_the_archive_has_it() {
    let index = fixture("trixie-backports-2026-12.Packages");
    let args = |v| ["qemu", "trixie-backports", "11.1", "10.1", v];
    assert_eq!(
        resolve(&args("1:11.1.3+ds-2~bpo13+1"), &index).picked(),
        "1:11.1.3+ds-2~bpo13+1"
    );
    let r = resolve(&args("1:11.1.3+ds-1~bpo13+1"), &index);
    let line = r.error();
    assert!(
        line.contains("APERTURE_QEMU_DEB_VERSION=1:11.1.3+ds-1~bpo13+1 is not in trixie-backports"),
        "{line}"
    );
    assert!(line.contains("1:11.1.3+ds-2~bpo13+1"), "{line}");
}

#[test]
fn kernel_is_the_newest_signed_image_of_the_series_and_flavour() {
    let index = fixture("bookworm-backports-2026-12.Packages");
    let r = kernel("bookworm-backports", "6.12", &index);
    // Package, Debian version, and the release (`uname -r`, the modules' directory).
    assert_eq!(
        r.picked(),
        "linux-image-6.12.95+deb12-cloud-amd64 6.12.95-1~bpo12+1 6.12.95+deb12-cloud-amd64"
    );
    // Not the -unsigned or -dbg build of the same kernel, nor the meta-package.
    assert!(index.contains("linux-image-6.12.95+deb12-cloud-amd64-unsigned"));
    // Two ABIs of one upstream release: the Debian version decides (6.12.90-2 > 6.12.90-1).
    let ninety = only(&index, |p| p.starts_with("linux-image-6.12.90+"));
    assert_eq!(
        kernel("bookworm-backports", "6.12", &ninety).picked(),
        "linux-image-6.12.90+deb12.1-cloud-amd64 6.12.90-2~bpo12+1 6.12.90+deb12.1-cloud-amd64"
    );
}

#[test]
fn kernel_refuses_the_virtio_iommu_regression_series() {
    let index = fixture("trixie-backports-2026-12.Packages");
    // 6.15.x: the whole series.
    let line = kernel("trixie-backports", "6.15", &index)
        .error()
        .to_string();
    assert!(line.contains("known-bad range"), "{line}");
    assert!(line.contains("APERTURE_KERNEL_SERIES"), "{line}");
    // 6.16: 6.16.3 is in the archive but refused; 6.16.12 is taken.
    assert_eq!(
        kernel("trixie-backports", "6.16", &index).picked(),
        "linux-image-6.16.12+deb13-cloud-amd64 6.16.12-1~bpo13+1 6.16.12+deb13-cloud-amd64"
    );
    let only_bad = only(&index, |p| p.starts_with("linux-image-6.16.3+"));
    let line = kernel("trixie-backports", "6.16", &only_bad)
        .error()
        .to_string();
    assert!(
        line.contains("refused: linux-image-6.16.3+deb13-cloud-amd64"),
        "{line}"
    );
    // An exact package in the range is refused too.
    let r = resolve(
        &[
            "kernel",
            "trixie-backports",
            "6.16",
            "cloud-amd64",
            "linux-image-6.16.3+deb13-cloud-amd64",
        ],
        &index,
    );
    assert!(r.error().contains("refused"), "{}", r.err);
}

#[test]
fn kernel_series_gone_names_the_series_there() {
    // bookworm-backports' series, asked of trixie-backports, which has moved on.
    let line = kernel(
        "trixie-backports",
        "6.12",
        &fixture("trixie-backports-2026-12.Packages"),
    )
    .error()
    .to_string();
    assert!(
        line.contains("no 6.12.x cloud-amd64 kernel in trixie-backports"),
        "{line}"
    );
    assert!(line.contains("6.16.12, 6.17.8, 6.17.13, 7.3.4"), "{line}");
}

#[test]
fn an_empty_suite_fails_in_one_line_for_qemu_and_kernel() {
    let empty = fixture("empty.Packages");
    assert!(empty.is_empty());
    let line = qemu("11.1", &empty).error().to_string();
    assert!(
        line.contains("trixie-backports has no qemu-system-x86 at all"),
        "{line}"
    );
    assert!(line.contains("APERTURE_QEMU_BACKPORTS_SUITE"), "{line}");
    let line = kernel("bookworm-backports", "6.12", &empty)
        .error()
        .to_string();
    assert!(
        line.contains("bookworm-backports has no linux-image-*-cloud-amd64 at all"),
        "{line}"
    );
}

#[test]
fn bad_command_lines_are_refused() {
    let r = resolve(&["qemu", "trixie-backports"], "");
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("usage:"), "{}", r.err);
    let r = resolve(&["kernels"], "");
    assert_eq!(r.code, Some(1));
    assert!(r.err.contains("usage:"), "{}", r.err);
}
