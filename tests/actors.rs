//! The pipeline's actors without a GPU: order, back-pressure, shutdown with messages in
//! flight, a panicking handler, and the gather threads (chunk copies, a panic in one).

use crossbeam_channel::bounded;
use shadowkv::pipeline::{Actor, ActorSpec, GatherPool};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn messages_are_handled_in_order() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let actor = Actor::spawn(ActorSpec::new("order", 4), move |m: u32| s.lock().unwrap().push(m)).unwrap();
    for m in 0..1000 {
        actor.send(m).unwrap();
    }
    actor.stop().unwrap();
    assert_eq!(*seen.lock().unwrap(), (0..1000).collect::<Vec<_>>());
}

#[test]
fn a_full_inbox_blocks_the_sender() {
    // The handler waits for a release per message: the inbox (2) plus the message in
    // hand hold 3, so the 4th send must block until one is released.
    let (release, gate) = bounded::<()>(0);
    let actor = Arc::new(Actor::spawn(ActorSpec::new("pressure", 2), move |_: u32| gate.recv().unwrap()).unwrap());
    for m in 0..3 {
        actor.send(m).unwrap();
    }
    let sent = Arc::new(AtomicUsize::new(0));
    let (a, s) = (actor.clone(), sent.clone());
    let sender = std::thread::spawn(move || {
        a.send(3).unwrap();
        s.store(1, Ordering::SeqCst);
    });
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(sent.load(Ordering::SeqCst), 0, "a send into a full inbox returned");
    assert_eq!(actor.depth(), 2);
    release.send(()).unwrap();
    sender.join().unwrap();
    assert_eq!(sent.load(Ordering::SeqCst), 1);
    for _ in 0..3 {
        release.send(()).unwrap();
    }
    Arc::try_unwrap(actor).ok().unwrap().stop().unwrap();
}

#[test]
fn stop_handles_the_messages_in_flight() {
    // The handler is held at a gate until the sender is dropped, so the messages are
    // still queued when stop is called.
    let (open, gate) = bounded::<()>(0);
    let total = Arc::new(AtomicUsize::new(0));
    let t = total.clone();
    let actor = Actor::spawn(ActorSpec::new("drain", 64), move |m: usize| {
        let _ = gate.recv();
        t.fetch_add(m, Ordering::SeqCst);
    })
    .unwrap();
    for m in 1..=50 {
        actor.send(m).unwrap();
    }
    assert!(
        actor.depth() >= 49,
        "the messages should still be queued: {}",
        actor.depth()
    );
    assert_eq!(total.load(Ordering::SeqCst), 0);
    drop(open);
    actor.stop().unwrap();
    assert_eq!(total.load(Ordering::SeqCst), 50 * 51 / 2);
}

#[test]
fn a_panicking_handler_is_reported_not_hung() {
    let actor = Actor::spawn(ActorSpec::new("fragile", 1), |m: u32| {
        assert!(m != 7, "message seven is poison");
    })
    .unwrap();
    actor.send(1).unwrap();
    actor.send(7).unwrap();
    // The thread is gone: a later send fails (the inbox may take one more first).
    let mut failed = None;
    for m in 0..100 {
        if let Err(e) = actor.send(m) {
            failed = Some(e.to_string());
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let failed = failed.expect("sends to a dead actor kept succeeding");
    assert!(failed.contains("actor `fragile` stopped"), "{failed}");
    let e = actor.stop().unwrap_err().to_string();
    assert!(e.contains("fragile") && e.contains("message seven is poison"), "{e}");
}

#[test]
fn the_busy_ratio_and_counts_follow_the_work() {
    let born = Instant::now();
    let actor = Actor::spawn(ActorSpec::new("busy", 8), |_: ()| {
        std::thread::sleep(Duration::from_millis(20))
    })
    .unwrap();
    assert_eq!(actor.busy_ratio(), 0.0);
    for _ in 0..5 {
        actor.send(()).unwrap();
    }
    for _ in 0..500 {
        if actor.handled() == 5 {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(actor.handled(), 5);
    assert_eq!(actor.depth(), 0);
    // At least 100 ms of handling in a life no longer than `born.elapsed()`; never
    // above 1.
    let r = actor.busy_ratio();
    let floor = 0.1 / born.elapsed().as_secs_f64();
    assert!(r >= floor && r <= 1.0, "busy ratio {r}, at least {floor}");
    assert_eq!(actor.name(), "busy");
    actor.stop().unwrap();
}

#[test]
fn gather_copies_every_chunk_to_its_place() {
    let chunk = 48;
    let src: Vec<u32> = (0..chunk as u32 * 1000).collect();
    for threads in [1, 3, 8] {
        let pool = GatherPool::new(threads, &[]).unwrap();
        assert_eq!(pool.threads(), threads);
        // Sources in a scrambled order, one repeated, one not aligned to a chunk.
        let mut sources: Vec<usize> = (0..257).map(|i| (i * 389 % 999) * chunk).collect();
        sources.push(sources[3]);
        sources.push(17);
        let mut dst = vec![u32::MAX; sources.len() * chunk + 5];
        pool.gather(&src, &sources, chunk, &mut dst).unwrap();
        for (i, &s) in sources.iter().enumerate() {
            assert_eq!(
                &dst[i * chunk..][..chunk],
                &src[s..s + chunk],
                "threads {threads}, chunk {i}"
            );
        }
        assert!(
            dst[sources.len() * chunk..].iter().all(|&v| v == u32::MAX),
            "wrote past the list"
        );
        // Fewer items than threads, and none.
        pool.gather(&src, &sources[..2], chunk, &mut dst).unwrap();
        pool.gather(&src, &[], chunk, &mut dst).unwrap();
    }
}

#[test]
fn gather_refuses_what_does_not_fit() {
    let pool = GatherPool::new(2, &[]).unwrap();
    let src = vec![0u16; 100];
    let mut dst = vec![0u16; 30];
    let e = pool
        .gather(&src, &[0, 10, 20, 30], 10, &mut dst)
        .unwrap_err()
        .to_string();
    assert!(e.contains("overflow the staging of 30"), "{e}");
    let e = pool.gather(&src, &[0, 95], 10, &mut dst).unwrap_err().to_string();
    assert!(e.contains("chunk at 95 lies outside the pool of 100"), "{e}");
    let e = pool
        .gather(&src, &[usize::MAX - 3], 10, &mut dst)
        .unwrap_err()
        .to_string();
    assert!(e.contains("outside the pool"), "{e}");
    assert!(GatherPool::new(0, &[]).is_err());
}

#[test]
fn a_panicking_gather_thread_fails_the_call_and_the_pool_goes_on() {
    let pool = GatherPool::new(4, &[]).unwrap();
    let done = AtomicUsize::new(0);
    let e = pool
        .for_each_range(400, &|r| {
            if r.contains(&250) {
                panic!("item 250 is unreadable");
            }
            done.fetch_add(r.len(), Ordering::SeqCst);
        })
        .unwrap_err()
        .to_string();
    assert!(e.contains("gather-2 panicked: item 250 is unreadable"), "{e}");
    // The other three threads did their ranges.
    assert_eq!(done.load(Ordering::SeqCst), 300);
    // The pool still serves.
    let src: Vec<u8> = (0..=255).collect();
    let mut dst = vec![0u8; 64];
    pool.gather(&src, &[64, 0, 192, 128], 16, &mut dst).unwrap();
    assert_eq!(dst[0], 64);
    assert_eq!(dst[48], 128);
}

/// The cpu-gather path's chunk copy: the pinned gather threads (as the daemon hands
/// them to the GPU backend) and the default rayon copy give the same staging, bit for
/// bit, on a pool's bytes (chunks of 1056: 8 tokens of 128 values in 8 bits); a chunk
/// outside the pool is an error, not a crash.
#[test]
fn gather_threads_and_rayon_stage_the_same_chunks() {
    use shadowkv::cuda::shadow::{ChunkGather, RayonGather};
    let chunk = 1056;
    let src: Vec<u8> = (0..chunk * 500).map(|i| (i % 251) as u8).collect();
    let sources: Vec<usize> = (0..123).map(|i| ((i * 37) % 500) * chunk).collect();
    let pool = GatherPool::new(3, &[]).unwrap();
    let threads: &dyn ChunkGather = &pool;
    let mut a = vec![0xa5u8; sources.len() * chunk];
    let mut b = a.clone();
    threads.gather(&src, &sources, chunk, &mut a).unwrap();
    RayonGather.gather(&src, &sources, chunk, &mut b).unwrap();
    assert_eq!(a, b);
    assert_eq!(&a[5 * chunk..6 * chunk], &src[sources[5]..sources[5] + chunk]);
    let bad = [src.len() - chunk + 1];
    let mut one = vec![0u8; chunk];
    assert!(threads.gather(&src, &bad, chunk, &mut one).is_err());
    assert!(RayonGather.gather(&src, &bad, chunk, &mut one).is_err());
}

/// The gather actors' metrics: per thread the share of the time between two
/// publications spent working (one thread slept 60 ms of a ~120 ms interval, the other
/// next to nothing) and its inbox depth, rendered by a real Prometheus recorder.
#[test]
fn gather_threads_publish_their_busy_ratio_and_inbox_depth() {
    use metrics_exporter_prometheus::PrometheusBuilder;
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    let pool = GatherPool::new(2, &[]).unwrap();
    // The interval between the two publications lies inside [t0, t0 + span].
    let t0 = Instant::now();
    metrics::with_local_recorder(&recorder, || pool.publish_metrics());
    // One item: only the first thread gets a range.
    pool.for_each_range(1, &|_| std::thread::sleep(Duration::from_millis(60)))
        .unwrap();
    // A thread adds its busy time just after it answers, before it takes its next
    // part: once both have answered an empty part, the sleep is counted.
    pool.for_each_range(2, &|_| {}).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    metrics::with_local_recorder(&recorder, || pool.publish_metrics());
    let span = t0.elapsed().as_secs_f64();
    let text = handle.render();
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing from\n{text}"))
    };
    let busy0 = value("shadowkv_actor_busy_ratio{actor=\"gather-0\"}");
    let busy1 = value("shadowkv_actor_busy_ratio{actor=\"gather-1\"}");
    assert!(
        busy0 >= 0.06 / span && busy0 <= 1.0,
        "gather-0 busy {busy0} over at most {span} s"
    );
    assert!(busy1 < 0.1, "gather-1 only ran an empty part: busy {busy1}");
    for t in ["gather-0", "gather-1"] {
        assert_eq!(
            value(&format!("shadowkv_actor_inbox_depth{{actor=\"{t}\"}}")),
            0.0,
            "{t}"
        );
    }
}
