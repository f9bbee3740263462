//! `aperture`, the one binary of the Aperture workspace.
//!
//! Today it has one subcommand, `demo`, which plays the requests Linux's virtio-iommu
//! driver sends against the `virtio-iommu` device model (through its fake guest
//! driver and real split virtqueues) and shows what device backends can and cannot
//! reach afterwards. Every step is checked, so `demo` doubles as an end-to-end smoke
//! test. The command line is defined here; the scenario lives in [`demo`] and its
//! rendering in [`report`].

mod demo;
mod report;
mod serve;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Largest `--endpoints` value: the demo gives each endpoint a PCI slot and a domain.
const MAX_ENDPOINTS: u32 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "aperture",
    version,
    about = "Aperture hands virtio device backends only the guest memory the guest opens for them.\n\
A backend (virtual disk, NIC, RNG...) normally sees all of guest RAM; here it sees only the\n\
apertures the guest maps. Today: the virtio-iommu device model, a demo driving it as Linux does,\n\
and a vfio-user device host serving it (and devices behind it) to QEMU.",
    after_help = "Examples:\n  \
aperture demo                  guest driver vs. virtio-iommu, human-readable report\n  \
aperture demo --endpoints 4    the same with four endpoints, each in its own domain\n  \
aperture demo --json           the same as a JSON summary (for scripts)\n\n\
aperture serve --dir /tmp/vm --disk disk.img --rng   serve devices to QEMU over vfio-user\n\n\
Not yet implemented: backend, layout, bench.\n\
Exit status: 0 success, 1 a demo check failed, 2 bad command line.",
    arg_required_else_help = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--iommu` of `serve`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum IommuArg {
    /// Devices behind our virtio-iommu; boot bypass off: nothing reachable until mapped.
    On,
    /// No virtio-iommu: devices reach all guest RAM.
    Off,
    /// virtio-iommu present, boot bypass on: unattached devices reach all RAM.
    Bypass,
}

/// One `--disk PATH[,ro]`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct DiskArg {
    path: std::path::PathBuf,
    read_only: bool,
}

fn parse_disk(s: &str) -> Result<DiskArg, String> {
    let (path, read_only) = match s.rsplit_once(',') {
        Some((p, "ro")) => (p, true),
        Some((_, opt)) => return Err(format!("unknown disk option '{opt}' (only 'ro' is known)")),
        None => (s, false),
    };
    if path.is_empty() {
        return Err("empty path".into());
    }
    Ok(DiskArg {
        path: path.into(),
        read_only,
    })
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve virtio-pci devices to QEMU over vfio-user: our virtio-iommu and the
    /// devices behind it.
    ///
    /// Creates one socket per PCI function in DIR, the VIOT table (DIR/viot.aml) that
    /// tells the guest our virtio-iommu translates for the other devices, and
    /// DIR/qemu-args: the QEMU arguments to append, one per line (guest RAM becomes a
    /// shared memfd, which vfio-user needs). Then serves until QEMU goes away. QEMU 10.1
    /// or newer with -device vfio-user-pci is needed (scripts/provision.sh installs one).
    #[command(after_help = "Examples:\n  \
aperture serve --dir /tmp/vm --disk disk.img --rng\n  \
qemu-system-x86_64 -M q35 -nographic -kernel vmlinuz ... $(cat /tmp/vm/qemu-args)\n  \
aperture serve --dir /tmp/vm --disk base.img,ro --iommu bypass\n\n\
Exit status: 0 after QEMU disconnected, 1 a device failed, 2 bad command line.")]
    Serve {
        /// Directory for the sockets, viot.aml and qemu-args (created if missing).
        #[arg(long, value_name = "DIR")]
        dir: std::path::PathBuf,
        /// A virtio-blk backed by a raw image (size a multiple of 512); ",ro" for read-only.
        #[arg(long, value_name = "PATH[,ro]", value_parser = parse_disk)]
        disk: Vec<DiskArg>,
        /// Add a virtio-rng.
        #[arg(long)]
        rng: bool,
        /// How the virtio-iommu is presented.
        #[arg(long, value_enum, default_value_t = IommuArg::On)]
        iommu: IommuArg,
        /// Test switch for the end-to-end tests: reads of this sector of the first disk
        /// are aimed at an IOVA the guest never mapped, so the IOMMU must deny them.
        #[arg(long, value_name = "SECTOR", hide = true)]
        test_fault_sector: Option<u64>,
        /// Guest RAM in MiB (QEMU's -m; RAM is a shared memfd of that size).
        #[arg(long, value_name = "MIB", default_value_t = 512,
              value_parser = clap::value_parser!(u32).range(64..=65536))]
        mem: u32,
    },
    /// Play Linux's virtio-iommu driver sequence and show what backends can reach.
    ///
    /// Builds a virtio-iommu with a virtio-blk (endpoint 0x08) and a virtio-rng
    /// (endpoint 0x10), drives it through split virtqueues as Linux does (features,
    /// config, PROBE, ATTACH, MAP, UNMAP, DETACH), and shows what each endpoint's
    /// backend sees through `vm_memory::IommuMemory`: mapped buffers with their
    /// rights, nothing else, and the fault events the guest receives. Every step is
    /// checked; the exit status is 1 if any check fails.
    #[command(after_help = "Examples:\n  aperture demo\n  aperture demo --endpoints 8 --json")]
    Demo {
        /// Number of endpoints (1 to 64); the first two are virtio-blk and virtio-rng.
        #[arg(
            long,
            value_name = "N",
            default_value_t = 2,
            value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_ENDPOINTS))
        )]
        endpoints: u32,
        /// Print a JSON summary instead of the human-readable report.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Usage errors exit with status 2 from here, `--help` and `--version` with 0.
    let cli = Cli::parse();
    match cli.command {
        Command::Demo { endpoints, json } => run_demo(endpoints, json),
        Command::Serve {
            dir,
            disk,
            rng,
            iommu,
            mem,
            test_fault_sector,
        } => serve::run(&dir, &disk, rng, iommu, mem, test_fault_sector),
    }
}

fn run_demo(endpoints: u32, json: bool) -> ExitCode {
    // A panic inside the device model or the fake guest is a failed check too: report
    // it as one and exit 1, not with the runtime's 101.
    let report = match std::panic::catch_unwind(|| demo::run(endpoints)) {
        Ok(report) => report,
        Err(_) => {
            eprintln!("aperture demo: FAILED: the demo panicked (message above)");
            return ExitCode::FAILURE;
        }
    };
    if json {
        match serde_json::to_string_pretty(&report.to_json()) {
            Ok(text) => println!("{text}"),
            Err(e) => {
                eprintln!("aperture demo: cannot render the JSON summary: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        print!("{}", report.to_text());
    }
    let failed = report.failed();
    if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        eprintln!(
            "aperture demo: FAILED: {} of {} checks failed:",
            failed.len(),
            report.checked()
        );
        for step in failed {
            eprintln!("  - {}", step.describe_failure());
        }
        ExitCode::FAILURE
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn endpoints_range_is_enforced() {
        assert!(Cli::try_parse_from(["aperture", "demo", "--endpoints", "0"]).is_err());
        assert!(Cli::try_parse_from(["aperture", "demo", "--endpoints", "65"]).is_err());
        assert!(Cli::try_parse_from(["aperture", "demo", "--endpoints", "64"]).is_ok());
    }
}
