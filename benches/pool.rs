//! Pool writes: one layer of a sequence's values (8 heads × 1024 chunks of 8 × 128 f32,
//! 32 MiB in, 8.3 MiB stored) written chunk by chunk, each row quantized to 8 bits, into
//! an anonymous and a file-backed value pool, against plain f32 copies into a vector
//! (the peer).
//!
//! `cargo bench --bench pool` (the file-backed pool is made in the system's temporary
//! directory).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use shadowkv::pool::{PoolShape, ValueFormat, ValuePool};

const HEADS: usize = 8;
const CHUNKS: usize = 1024;
const CHUNK: usize = 8 * 128;

fn bench(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("machine: {cores} hardware threads");
    let shape = PoolShape {
        layers: 2,
        seqs: 2,
        kv_heads: HEADS,
        chunks: CHUNKS,
        chunk: 8,
        head_dim: 128,
        format: ValueFormat::Int8,
    };
    let values: Vec<f32> = (0..CHUNK).map(|i| i as f32 * 0.5).collect();
    let mut g = c.benchmark_group("pool write");
    g.throughput(Throughput::Bytes((HEADS * CHUNKS * CHUNK * 4) as u64));
    g.sample_size(20);

    let mut plain = vec![0f32; HEADS * CHUNKS * CHUNK];
    g.bench_function("vector (peer)", |b| {
        b.iter(|| {
            for dst in plain.chunks_exact_mut(CHUNK) {
                dst.copy_from_slice(&values);
            }
        })
    });

    let dir = tempfile::tempdir().expect("temporary directory");
    let pools = [
        ("anonymous", ValuePool::anonymous(shape).expect("anonymous pool")),
        (
            "file-backed",
            ValuePool::file_backed(shape, &dir.path().join("values.pool")).expect("file-backed pool"),
        ),
    ];
    for (name, pool) in &pools {
        let mut lease = pool.lease().expect("a free slot");
        g.bench_function(*name, |b| {
            b.iter(|| {
                for h in 0..HEADS {
                    for ch in 0..CHUNKS {
                        lease.write(1, h, ch, &values);
                    }
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
