//! What a doorbell costs us. QEMU forwards every virtqueue kick to the device host as a
//! vfio-user REGION_WRITE message on the function's socket (the `vfio_user` 0.1.7
//! server has no GET_REGION_IO_FDS, so no ioeventfd route). Run with
//!
//! ```text
//! cargo bench -p device-host --bench doorbell -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Criterion keeps every figure as JSON under `target/criterion/doorbell/<bench>/`.
//! Each figure is time per operation:
//!
//! - `config_read_round_trip`: a 2-byte REGION_READ of the virtio-iommu's PCI config
//!   space (the vendor ID) through `vfio_user::Client`: request, server dispatch,
//!   reply. The floor of any message on the socket.
//! - `notify_empty_round_trip`: a 2-byte REGION_WRITE to the notify address of the
//!   virtio-iommu's request queue, which is set up and live but has no new buffers, so
//!   the device only reads the avail index and finds nothing: the pure doorbell cost.
//!   The client waits for the server's reply; QEMU posts these writes (no reply,
//!   `x-no-posted-writes=off`), so its vCPU pays only the send, while the device host
//!   pays all of the server side.
//! - `notify_empty_in_process`: the same empty notify handed straight to a function's
//!   `ServerBackend::region_write` in this thread (a virtio-rng without an IOMMU, set up
//!   the same way): the dispatch and queue check without the socket, so the difference
//!   to the round trip is what the socket and the thread switches cost.
//!
//! The round trips depend on where the scheduler puts the two threads. On a 2-vCPU
//! KVM guest with nothing else running they measured ~5 µs with client and server on
//! one CPU (`taskset -c 0`, or another process keeping the second CPU busy), but ~70 µs
//! when each message had to wake the other, idle, vCPU: compare both before drawing
//! conclusions.
//!
//! Before timing, each queue is checked to be live: one real request is posted and
//! kicked and must come back in the used ring, so the timed kicks cannot be no-ops of
//! a queue that is not ready.
#![allow(clippy::unwrap_used)] // a bench that cannot set up fails by panicking
#![allow(missing_docs)] // criterion's macros generate undocumented items

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use device_host::endpoints::RngFactory;
use device_host::host::{
    endpoint_id, plain_layout, DeviceHost, EndpointFactory, IommuMode, IOMMU_SLOT,
};
use std::fs::File;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::time::Duration;
use vfio_bindings::bindings::vfio::{VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX};
use vfio_user::{Client, DmaMapFlags, ServerBackend};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{map_ram_and_irqs, ram_file, scratch_dir, RAM};

const BAR0: u32 = VFIO_PCI_BAR0_REGION_INDEX;
const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;
/// Queue 0's rings in guest RAM.
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
/// Queue 0's notify address in BAR 0 (`Bar0Layout::NOTIFY`, queue 0).
const NOTIFY: u64 = 0x3000;

/// BAR 0 and config-space accesses, over the socket or in-process.
trait Regions {
    fn read(&mut self, region: u32, off: u64, data: &mut [u8]);
    fn write(&mut self, region: u32, off: u64, data: &[u8]);

    fn read_u32(&mut self, off: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        self.read(BAR0, off, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    fn write_le(&mut self, off: u64, v: u64, len: usize) {
        self.write(BAR0, off, &v.to_le_bytes()[..len]);
    }

    /// Linux's virtio-pci init: status, all offered features, queue 0 of 16 entries
    /// at [`DESC`]/[`AVAIL`]/[`USED`] with MSI-X vector 1, DRIVER_OK.
    fn init_queue0(&mut self) {
        self.write_le(0x14, 1 | 2, 1);
        for sel in 0..2u64 {
            self.write_le(0x00, sel, 4);
            let f = self.read_u32(0x04, 4);
            self.write_le(0x08, sel, 4);
            self.write_le(0x0c, u64::from(f), 4);
        }
        self.write_le(0x14, 1 | 2 | 8, 1);
        assert_eq!(self.read_u32(0x14, 1), 1 | 2 | 8, "FEATURES_OK");
        self.write_le(0x16, 0, 2);
        self.write_le(0x18, 16, 2);
        self.write_le(0x1a, 1, 2);
        self.write_le(0x20, DESC, 8);
        self.write_le(0x28, AVAIL, 8);
        self.write_le(0x30, USED, 8);
        self.write_le(0x1c, 1, 2);
        self.write_le(0x14, 1 | 2 | 8 | 4, 1);
        assert_eq!(self.read_u32(0x14, 1), 1 | 2 | 8 | 4, "DRIVER_OK");
    }
}

impl Regions for Client {
    fn read(&mut self, region: u32, off: u64, data: &mut [u8]) {
        self.region_read(region, off, data).unwrap();
    }
    fn write(&mut self, region: u32, off: u64, data: &[u8]) {
        self.region_write(region, off, data).unwrap();
    }
}

impl Regions for Box<dyn ServerBackend + Send> {
    fn read(&mut self, region: u32, off: u64, data: &mut [u8]) {
        self.region_read(region, off, data).unwrap();
    }
    fn write(&mut self, region: u32, off: u64, data: &[u8]) {
        self.region_write(region, off, data).unwrap();
    }
}

fn desc(addr: u64, len: u32, flags: u16, next: u16) -> Vec<u8> {
    let mut d = addr.to_le_bytes().to_vec();
    d.extend_from_slice(&len.to_le_bytes());
    d.extend_from_slice(&flags.to_le_bytes());
    d.extend_from_slice(&next.to_le_bytes());
    d
}

/// Makes chain `head` the one available buffer (avail idx 1).
fn post_one(ram: &File, head: u16) {
    ram.write_all_at(&head.to_le_bytes(), AVAIL + 4).unwrap();
    ram.write_all_at(&1u16.to_le_bytes(), AVAIL + 2).unwrap();
}

fn used_idx(ram: &File) -> u16 {
    let mut b = [0u8; 2];
    ram.read_exact_at(&mut b, USED + 2).unwrap();
    u16::from_le_bytes(b)
}

fn doorbell(c: &mut Criterion) {
    // Over the socket: the device host serving our virtio-iommu and an rng behind it.
    let dir = scratch_dir("bench-doorbell");
    let eps: Vec<Box<dyn EndpointFactory>> = vec![Box::new(RngFactory::new("rng"))];
    // No poller: this measures the doorbell path itself.
    let host = DeviceHost::new(
        &dir,
        IommuMode::On,
        &plain_layout(64).unwrap(),
        eps,
        Duration::ZERO,
    )
    .unwrap();
    let served = std::thread::spawn(move || host.run(Duration::from_millis(200)));
    let mut client = Client::new(&dir.join("iommu.sock")).unwrap();
    let ram = ram_file(&dir);
    let _irqs = map_ram_and_irqs(&mut client, &ram, 3);
    client.init_queue0();
    // One ATTACH(domain 1, the rng's endpoint) must come back used: the queue is live.
    let mut req = vec![1u8, 0, 0, 0];
    req.extend_from_slice(&1u32.to_le_bytes());
    req.extend_from_slice(&endpoint_id(IOMMU_SLOT + 1).to_le_bytes());
    req.extend_from_slice(&[0; 8]);
    ram.write_all_at(&req, 0x10000).unwrap();
    ram.write_all_at(&desc(0x10000, 20, 1, 1), DESC).unwrap();
    ram.write_all_at(&desc(0x11000, 4, 2, 0), DESC + 16)
        .unwrap();
    post_one(&ram, 0);
    client.write_le(NOTIFY, 0, 2);
    assert_eq!(
        used_idx(&ram),
        1,
        "the virtio-iommu's request queue is live"
    );

    // In-process: an rng function without an IOMMU, set up the same way.
    let pdir = scratch_dir("bench-doorbell-inproc");
    let pram = ram_file(&pdir);
    let mut backend = Box::new(RngFactory::new("rng-inproc"))
        .build(None)
        .unwrap()
        .backend;
    backend
        .dma_map(
            DmaMapFlags::READ_WRITE,
            0,
            0,
            RAM,
            Some(pram.try_clone().unwrap()),
        )
        .unwrap();
    backend.init_queue0();
    pram.write_all_at(&desc(0x10000, 16, 2, 0), DESC).unwrap();
    post_one(&pram, 0);
    backend.write_le(NOTIFY, 0, 2);
    assert_eq!(used_idx(&pram), 1, "the rng's queue is live");

    let mut g = c.benchmark_group("doorbell");
    g.throughput(Throughput::Elements(1));
    g.bench_function("config_read_round_trip", |b| {
        let mut v = [0u8; 2];
        b.iter(|| {
            client.read(CONFIG, 0, &mut v);
            black_box(v)
        })
    });
    g.bench_function("notify_empty_round_trip", |b| {
        b.iter(|| client.write(BAR0, NOTIFY, black_box(&[0, 0])))
    });
    g.bench_function("notify_empty_in_process", |b| {
        b.iter(|| backend.write(BAR0, NOTIFY, black_box(&[0, 0])))
    });
    g.finish();

    // Nothing new was ever posted, so nothing more was used.
    assert_eq!(used_idx(&ram), 1, "empty kicks used nothing");
    assert_eq!(used_idx(&pram), 1, "empty kicks used nothing");
    client.shutdown().unwrap();
    drop(client);
    let _ = served.join();
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&pdir);
}

criterion_group!(benches, doorbell);
criterion_main!(benches);
