//! An actor round trip: a message to an actor and its answer back, against the same
//! ping-pong over two bare channels between two threads (the peer).
//!
//! `cargo bench --bench actor`.

use criterion::{criterion_group, criterion_main, Criterion};
use crossbeam_channel::{bounded, Sender};
use shadowkv::pipeline::{Actor, ActorSpec};

fn bench(c: &mut Criterion) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    eprintln!("machine: {cores} hardware threads");
    let mut g = c.benchmark_group("round trip");

    let (to_peer, peer_in) = bounded::<u64>(1);
    let (peer_out, from_peer) = bounded::<u64>(1);
    let peer = std::thread::spawn(move || {
        for m in peer_in.iter() {
            peer_out.send(m + 1).expect("answer");
        }
    });
    g.bench_function("two channels (peer)", |b| {
        b.iter(|| {
            to_peer.send(1).expect("send");
            from_peer.recv().expect("answer")
        })
    });
    drop(to_peer);
    peer.join().expect("peer thread");

    let actor = Actor::spawn(ActorSpec::new("echo", 1), |(m, reply): (u64, Sender<u64>)| {
        reply.send(m + 1).expect("answer");
    })
    .expect("actor");
    let (reply, answers) = bounded::<u64>(1);
    g.bench_function("actor", |b| {
        b.iter(|| {
            actor.send((1, reply.clone())).expect("send");
            answers.recv().expect("answer")
        })
    });
    g.finish();
    actor.stop().expect("stop");
}

criterion_group!(benches, bench);
criterion_main!(benches);
