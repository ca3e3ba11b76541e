//! The value gather on the host: missed chunks copied from a pool into staging by the
//! gather threads, against one thread copying the same list (the peer).
//!
//! `cargo bench --bench gather`. The pool is 1 GiB of values in 8 bits in chunks of 8
//! tokens × 128 dims (1056 bytes: codes, a scale a token, padding; a Llama-3.1-8B head's
//! chunk); each step gathers 8192 random chunks (8.25 MiB, about one layer's misses at
//! batch 16 with a 10 % hit rate).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use shadowkv::pipeline::GatherPool;

const CHUNK: usize = 8 * (128 + 4);
const POOL_CHUNKS: usize = (1 << 30) / CHUNK;
const MISSES: usize = 8192;

fn bench(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("machine: {cores} hardware threads");
    let pool: Vec<u8> = (0..POOL_CHUNKS * CHUNK).map(|i| (i % 251) as u8).collect();
    // A fixed scramble of chunk ids (a multiplicative hash), the same every run.
    let sources: Vec<usize> = (0..MISSES).map(|i| (i * 2_654_435_761 % POOL_CHUNKS) * CHUNK).collect();
    let mut staging = vec![0u8; MISSES * CHUNK];
    let mut g = c.benchmark_group("gather");
    g.throughput(Throughput::Bytes((MISSES * CHUNK) as u64));
    g.sample_size(30);
    g.bench_function("one thread (peer)", |b| {
        b.iter(|| {
            for (dst, &s) in staging.chunks_exact_mut(CHUNK).zip(&sources) {
                dst.copy_from_slice(&pool[s..s + CHUNK]);
            }
        })
    });
    let mut threads = vec![1, 2, 4, cores];
    threads.sort_unstable();
    threads.dedup();
    for n in threads.into_iter().filter(|&n| n <= cores) {
        let gp = GatherPool::new(n, &[]).expect("gather threads");
        g.bench_with_input(BenchmarkId::new("gather pool", n), &n, |b, _| {
            b.iter(|| gp.gather(&pool, &sources, CHUNK, &mut staging).expect("gather"))
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
