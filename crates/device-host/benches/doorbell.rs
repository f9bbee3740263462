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
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::time::Duration;
use test_kit::pci::{reg::NOTIFY, Bar0};
use test_kit::{r, w, TempDir};
use vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
use vfio_user::{Client, DmaMapFlags};

#[path = "../tests/common/mod.rs"]
mod common;
use common::{init_queue0, map_ram_and_irqs, queue0, ram_file, RAM};

const CONFIG: u32 = VFIO_PCI_CONFIG_REGION_INDEX;

fn doorbell(c: &mut Criterion) {
    // Over the socket: the device host serving our virtio-iommu and an rng behind it.
    let dir = TempDir::new("bench-doorbell");
    let eps: Vec<Box<dyn EndpointFactory>> = vec![Box::new(RngFactory::new("rng"))];
    // No poller: this measures the doorbell path itself.
    let host = DeviceHost::new(
        dir.path(),
        IommuMode::On,
        &plain_layout(64).unwrap(),
        eps,
        Duration::ZERO,
    )
    .unwrap();
    let served = std::thread::spawn(move || host.run(Duration::from_millis(200)));
    let mut client = Client::new(&dir.join("iommu.sock")).unwrap();
    let ram = ram_file("aperture-bench-doorbell-ram");
    let mut ring = queue0(&ram);
    let _irqs = map_ram_and_irqs(&mut client, &ram, 3);
    init_queue0(&mut client);
    // One ATTACH(domain 1, the rng's endpoint) must come back used: the queue is live.
    let mut req = vec![1u8, 0, 0, 0];
    req.extend_from_slice(&1u32.to_le_bytes());
    req.extend_from_slice(&endpoint_id(IOMMU_SLOT + 1).to_le_bytes());
    req.extend_from_slice(&[0; 8]);
    ram.write_all_at(&req, 0x10000).unwrap();
    ring.post(&[r(0x10000, 20), w(0x11000, 4)]);
    client.bar0_write(NOTIFY, &[0, 0]);
    assert_eq!(
        ring.used_idx(),
        1,
        "the virtio-iommu's request queue is live"
    );

    // In-process: an rng function without an IOMMU, set up the same way.
    let pram = ram_file("aperture-bench-doorbell-inproc-ram");
    let mut pring = queue0(&pram);
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
    init_queue0(&mut backend);
    pring.post(&[w(0x10000, 16)]);
    backend.bar0_write(NOTIFY, &[0, 0]);
    assert_eq!(pring.used_idx(), 1, "the rng's queue is live");

    let mut g = c.benchmark_group("doorbell");
    g.throughput(Throughput::Elements(1));
    g.bench_function("config_read_round_trip", |b| {
        let mut v = [0u8; 2];
        b.iter(|| {
            client.region_read(CONFIG, 0, &mut v).unwrap();
            black_box(v)
        })
    });
    g.bench_function("notify_empty_round_trip", |b| {
        b.iter(|| client.bar0_write(NOTIFY, black_box(&[0, 0])))
    });
    g.bench_function("notify_empty_in_process", |b| {
        b.iter(|| backend.bar0_write(NOTIFY, black_box(&[0, 0])))
    });
    g.finish();

    // Nothing new was ever posted, so nothing more was used.
    assert_eq!(ring.used_idx(), 1, "empty kicks used nothing");
    assert_eq!(pring.used_idx(), 1, "empty kicks used nothing");
    client.shutdown().unwrap();
    drop(client);
    let _ = served.join();
}

criterion_group!(benches, doorbell);
criterion_main!(benches);
