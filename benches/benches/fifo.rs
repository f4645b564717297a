//! Micro-benchmarks of the shared-memory FIFO and message queue.
//!
//! * `fifo_1thread/{64,1500,16384}`: enqueue one chunk then dequeue it, on
//!   one thread (the raw copy + index cost per chunk).
//! * `fifo_2thread/16384`: a producer thread streams 16 KiB chunks through a
//!   256 KiB FIFO to a consumer thread (cross-core throughput).
//! * `mq_1thread/send_recv` and `mq_2thread/send_recv`: 64-byte messages.
//!
//! All rings live in a real memfd mapping ([`ShmRegion`]). Run with
//! `cargo bench -p hoststack-benches --bench fifo` (about 30 s).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use session_api::fifo::{fifo_footprint, fifo_init, FifoConsumer, FifoProducer};
use session_api::mq::{mq_footprint, mq_init, MqConsumer, MqProducer, RawMsg};
use session_api::shm::ShmRegion;
use std::hint::black_box;
use std::time::{Duration, Instant};

/// A FIFO of `cap` bytes in its own shared mapping.
fn fifo(cap: u32) -> (ShmRegion, FifoProducer, FifoConsumer) {
    let region = ShmRegion::create("bench-fifo", fifo_footprint(cap)).expect("memfd");
    let base = region.as_ptr();
    // SAFETY: the mapping holds the whole FIFO, is page aligned, and is
    // returned alongside the handles, which every caller drops first.
    unsafe {
        fifo_init(base, cap, 0);
        (
            region,
            FifoProducer::new(base, cap),
            FifoConsumer::new(base, cap),
        )
    }
}

/// A queue of `slots` messages in its own shared mapping.
fn mq(slots: u32) -> (ShmRegion, MqProducer, MqConsumer) {
    let region = ShmRegion::create("bench-mq", mq_footprint(slots)).expect("memfd");
    let base = region.as_ptr();
    // SAFETY: as in `fifo`.
    unsafe {
        mq_init(base, slots);
        (
            region,
            MqProducer::new(base, slots),
            MqConsumer::new(base, slots),
        )
    }
}

fn fifo_single_thread(c: &mut Criterion) {
    let mut g = c.benchmark_group("fifo_1thread");
    for chunk in [64usize, 1500, 16384] {
        let (_region, mut p, mut cons) = fifo(64 * 1024);
        let src = vec![0xa5u8; chunk];
        let mut dst = vec![0u8; chunk];
        g.throughput(Throughput::Bytes(chunk as u64));
        g.bench_with_input(BenchmarkId::from_parameter(chunk), &chunk, |b, _| {
            b.iter(|| {
                let n = p.enqueue(black_box(&src)).unwrap();
                let m = cons.dequeue(black_box(&mut dst)).unwrap();
                debug_assert_eq!(n, m);
                m
            })
        });
    }
    g.finish();
}

fn fifo_two_threads(c: &mut Criterion) {
    const CHUNK: usize = 16 * 1024;
    let mut g = c.benchmark_group("fifo_2thread");
    g.throughput(Throughput::Bytes(CHUNK as u64));
    g.bench_function(BenchmarkId::from_parameter(CHUNK), |b| {
        b.iter_custom(|iters| {
            let (_region, mut p, mut cons) = fifo(256 * 1024);
            let total = iters * CHUNK as u64;
            let src = vec![0x5au8; CHUNK];
            let t0 = Instant::now();
            std::thread::scope(|s| {
                s.spawn(move || {
                    let mut dst = vec![0u8; CHUNK];
                    let mut got = 0u64;
                    while got < total {
                        let n = cons.dequeue(&mut dst).unwrap();
                        if n == 0 {
                            std::hint::spin_loop();
                        }
                        got += n as u64;
                    }
                });
                let mut sent = 0u64;
                while sent < total {
                    let want = (total - sent).min(CHUNK as u64) as usize;
                    let n = p.enqueue(&src[..want]).unwrap();
                    if n == 0 {
                        std::hint::spin_loop();
                    }
                    sent += n as u64;
                }
            });
            t0.elapsed()
        })
    });
    g.finish();
}

fn mq_bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("mq_1thread");
    g.throughput(Throughput::Elements(1));
    let (_region, mut p, mut cons) = mq(1024);
    let msg = RawMsg([7; 64]);
    g.bench_function("send_recv", |b| {
        b.iter(|| {
            p.try_send(black_box(&msg)).unwrap();
            black_box(p.wake_needed());
            cons.try_recv().unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("mq_2thread");
    g.throughput(Throughput::Elements(1));
    g.bench_function("send_recv", |b| {
        b.iter_custom(|iters| {
            let (_region, mut p, mut cons) = mq(1024);
            let t0 = Instant::now();
            std::thread::scope(|s| {
                s.spawn(move || {
                    let mut got = 0u64;
                    while got < iters {
                        match cons.try_recv().unwrap() {
                            Some(m) => {
                                black_box(m);
                                got += 1;
                            }
                            None => std::hint::spin_loop(),
                        }
                    }
                });
                for _ in 0..iters {
                    while p.try_send(&msg).is_err() {
                        std::hint::spin_loop();
                    }
                    black_box(p.wake_needed());
                }
            });
            t0.elapsed()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(30);
    targets = fifo_single_thread, fifo_two_threads, mq_bench
}
criterion_main!(benches);
