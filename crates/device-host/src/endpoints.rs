//! The endpoint devices the host can serve, as [`EndpointFactory`]s: virtio-blk on a
//! raw image and virtio-rng (from `virtio-devices`). A factory checks what it can up
//! front (the image opens, its size is whole sectors) so bad input is reported before
//! any socket exists; the device is built once the host knows whether it sits behind
//! the IOMMU.

use crate::host::{serve_endpoint, EndpointFactory};
use std::path::{Path, PathBuf};
use vfio_user::ServerBackend;
use virtio_devices::{Block, BlockConfig, Rng, RngConfig};
use virtio_iommu::EndpointIommu;

/// PCI class code of a mass-storage controller, "other" subclass.
const CLASS_STORAGE_OTHER: u32 = 0x01_80_00;
/// PCI class code "unassigned/other", as QEMU gives virtio-rng.
const CLASS_OTHER: u32 = 0xff_00_00;

/// A virtio-blk on a raw image.
#[derive(Debug)]
pub struct BlockFactory {
    name: String,
    config: BlockConfig,
}

impl BlockFactory {
    /// Test switch (see `virtio_devices::BlockConfig::test_stray_sector`): reads of
    /// `sector` are aimed at an address the guest never mapped.
    pub fn with_test_stray_sector(mut self, sector: Option<u64>) -> Self {
        self.config.test_stray_sector = sector;
        self
    }

    /// Checks the image can be opened as asked and holds whole 512-byte sectors.
    ///
    /// # Errors
    /// The device's error, naming the file and what is wrong with it.
    pub fn new(
        name: &str,
        path: &Path,
        read_only: bool,
    ) -> Result<Self, virtio_devices::BlockError> {
        let config = BlockConfig {
            path: PathBuf::from(path),
            read_only,
            access_platform: false,
            test_stray_sector: None,
        };
        // Open once now to report a bad image before serving; `build` opens it again.
        Block::new(&config)?;
        Ok(Self {
            name: name.to_string(),
            config,
        })
    }
}

impl EndpointFactory for BlockFactory {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn build(
        self: Box<Self>,
        iommu: Option<EndpointIommu>,
    ) -> Result<(Box<dyn ServerBackend + Send>, u16), String> {
        let config = BlockConfig {
            access_platform: iommu.is_some(),
            ..self.config
        };
        let dev = Block::new(&config).map_err(|e| e.to_string())?;
        serve_endpoint(dev, CLASS_STORAGE_OTHER, iommu)
    }
}

/// A virtio-rng fed from the host's /dev/urandom.
#[derive(Debug)]
pub struct RngFactory {
    name: String,
}

impl RngFactory {
    /// A virtio-rng named `name`.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_string(),
        }
    }
}

impl EndpointFactory for RngFactory {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn build(
        self: Box<Self>,
        iommu: Option<EndpointIommu>,
    ) -> Result<(Box<dyn ServerBackend + Send>, u16), String> {
        let config = RngConfig {
            access_platform: iommu.is_some(),
            ..RngConfig::default()
        };
        let dev = Rng::new(&config).map_err(|e| e.to_string())?;
        serve_endpoint(dev, CLASS_OTHER, iommu)
    }
}
