//! The endpoint devices the host can serve, as [`EndpointFactory`]s: virtio-blk on a
//! raw image and virtio-rng (from `virtio-devices`), and either one run by an external
//! vhost-user back-end ([`VhostUserFactory`]). A factory checks what it can up
//! front (the image opens, its size is whole sectors) so bad input is reported before
//! any socket exists; the device is built once the host knows whether it sits behind
//! the IOMMU.

use crate::host::{
    serve_endpoint, serve_pool_endpoint, BuildError, EndpointFactory, Function, PoolWindow,
};
use crate::vhost_user::{
    serve_vhost_user, serve_vhost_user_pool, DeviceKind, InflightConfig, VhostUserHandle,
};
use std::path::{Path, PathBuf};
use std::time::Duration;
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
    stray_addr: Option<u64>,
}

impl BlockFactory {
    /// Test switch (see `virtio_devices::BlockConfig::test_stray_sector`): reads of
    /// `sector` are aimed at an address the guest never mapped.
    pub fn with_test_stray_sector(mut self, sector: Option<u64>) -> Self {
        self.config.test_stray_sector = sector;
        self
    }

    /// Test switch: where those reads are aimed (default
    /// `virtio_devices::block::STRAY_IOVA`; see `Block::set_test_stray_addr`).
    pub fn with_test_stray_addr(mut self, addr: Option<u64>) -> Self {
        self.stray_addr = addr;
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
            stray_addr: None,
        })
    }
}

impl EndpointFactory for BlockFactory {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn build(self: Box<Self>, iommu: Option<EndpointIommu>) -> Result<Function, BuildError> {
        let config = BlockConfig {
            access_platform: iommu.is_some(),
            ..self.config
        };
        let mut dev = Block::new(&config)?;
        if let Some(a) = self.stray_addr {
            dev.set_test_stray_addr(a);
        }
        serve_endpoint(dev, CLASS_STORAGE_OTHER, iommu)
    }

    fn build_pool(self: Box<Self>, pool: PoolWindow) -> Result<Function, BuildError> {
        let config = BlockConfig {
            access_platform: true,
            ..self.config
        };
        let mut dev = Block::new(&config)?;
        if let Some(a) = self.stray_addr {
            dev.set_test_stray_addr(a);
        }
        serve_pool_endpoint(dev, CLASS_STORAGE_OTHER, pool)
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

    fn build(self: Box<Self>, iommu: Option<EndpointIommu>) -> Result<Function, BuildError> {
        let config = RngConfig {
            access_platform: iommu.is_some(),
            ..RngConfig::default()
        };
        let dev = Rng::new(&config)?;
        serve_endpoint(dev, CLASS_OTHER, iommu)
    }

    fn build_pool(self: Box<Self>, pool: PoolWindow) -> Result<Function, BuildError> {
        let config = RngConfig {
            access_platform: true,
            ..RngConfig::default()
        };
        serve_pool_endpoint(Rng::new(&config)?, CLASS_OTHER, pool)
    }
}

/// A device served by an external vhost-user back-end at a unix socket
/// ([`crate::vhost_user`]).
#[derive(Debug)]
pub struct VhostUserFactory {
    name: String,
    socket: PathBuf,
    kind: DeviceKind,
    timeout: Duration,
    inflight: Option<InflightConfig>,
    handle: Option<std::sync::mpsc::Sender<VhostUserHandle>>,
}

/// Why a vhost-user socket argument was refused.
#[derive(Debug, thiserror::Error)]
pub enum VhostUserArgError {
    /// The path does not exist or is not a unix socket.
    #[error("{path}: {why}")]
    NotSocket {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
}

impl VhostUserFactory {
    /// A `kind` device whose back-end listens at `socket`; each back-end answer is
    /// awaited at most `timeout` ([`crate::vhost_user::DEFAULT_TIMEOUT`] is 1 s). The
    /// connection is made when the host builds the device.
    ///
    /// # Errors
    /// [`VhostUserArgError`] if `socket` is not a unix socket.
    pub fn new(
        name: &str,
        socket: &Path,
        kind: DeviceKind,
        timeout: Duration,
    ) -> Result<Self, VhostUserArgError> {
        use std::os::unix::fs::FileTypeExt;
        let not = |why: String| VhostUserArgError::NotSocket {
            path: socket.to_path_buf(),
            why,
        };
        let meta = std::fs::metadata(socket).map_err(|e| not(e.to_string()))?;
        if !meta.file_type().is_socket() {
            return Err(not(
                "is not a unix socket (start the vhost-user back-end first)".into(),
            ));
        }
        Ok(Self {
            name: name.to_string(),
            socket: socket.to_path_buf(),
            kind,
            timeout,
            inflight: None,
            handle: None,
        })
    }

    /// Serves the device with implicit grants, copy form
    /// ([`crate::vhost_user::VhostUserDevice::inflight_copy`]): the back-end is given
    /// shadow rings and bounce buffers, never guest memory.
    pub fn with_inflight(mut self, cfg: InflightConfig) -> Self {
        self.inflight = Some(cfg);
        self
    }

    /// Sends the device's handle (counters, broken state) on `tx` once it is built.
    pub fn with_handle_sender(mut self, tx: std::sync::mpsc::Sender<VhostUserHandle>) -> Self {
        self.handle = Some(tx);
        self
    }
}

impl EndpointFactory for VhostUserFactory {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn build(self: Box<Self>, iommu: Option<EndpointIommu>) -> Result<Function, BuildError> {
        let (function, handle) =
            serve_vhost_user(&self.socket, self.kind, self.timeout, iommu, self.inflight)?;
        if let Some(tx) = self.handle {
            let _ = tx.send(handle);
        }
        Ok(function)
    }

    fn build_pool(self: Box<Self>, pool: PoolWindow) -> Result<Function, BuildError> {
        if self.inflight.is_some() {
            return Err(BuildError::NoPoolMode(format!(
                "{} with implicit grants",
                self.name
            )));
        }
        let (function, handle) =
            serve_vhost_user_pool(&self.socket, self.kind, self.timeout, pool)?;
        if let Some(tx) = self.handle {
            let _ = tx.send(handle);
        }
        Ok(function)
    }
}
