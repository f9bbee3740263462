//! `aperture serve`: builds the devices the command line asks for, hands them to the
//! device host, and serves until QEMU goes away.

use crate::{DiskArg, IommuArg};
use device_host::host::{DeviceHost, EndpointFactory};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

/// How long the other functions get to disconnect after the first one did.
const GRACE: Duration = Duration::from_secs(3);

pub(crate) fn run(
    dir: &Path,
    disks: &[DiskArg],
    rng: bool,
    iommu: IommuArg,
    mem: u32,
    test_fault_sector: Option<u64>,
) -> ExitCode {
    let mode = crate::mode(iommu);
    if disks.is_empty() && !rng {
        eprintln!("aperture serve: nothing to serve: give at least one --disk PATH or --rng");
        return ExitCode::from(2);
    }
    let mut endpoints: Vec<Box<dyn EndpointFactory>> = Vec::new();
    for (i, d) in disks.iter().enumerate() {
        match device_host::endpoints::BlockFactory::new(&format!("blk{i}"), &d.path, d.read_only) {
            Ok(f) => {
                let stray = if i == 0 { test_fault_sector } else { None };
                endpoints.push(Box::new(f.with_test_stray_sector(stray)))
            }
            Err(e) => {
                eprintln!("aperture serve: --disk {}: {e}", d.path.display());
                return ExitCode::from(2);
            }
        }
    }
    if rng {
        endpoints.push(Box::new(device_host::endpoints::RngFactory::new("rng")));
    }
    let host = match DeviceHost::new(dir, mode, mem, endpoints) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("aperture serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (name, socket, slot) in host.functions() {
        eprintln!(
            "aperture serve: {name} at 00:{slot:02x}.0 on {}",
            socket.display()
        );
    }
    eprintln!(
        "aperture serve: QEMU arguments in {}",
        dir.join("qemu-args").display()
    );
    let results = host.run(GRACE);
    let mut failed = false;
    for (name, r) in results {
        match r {
            Ok(()) => eprintln!("aperture serve: {name}: client disconnected"),
            Err(e) => {
                failed = true;
                eprintln!("aperture serve: {name}: {e}");
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
