//! Timers on a thread of their own (`streamgate::timers`): on a runtime built without a time
//! driver, streamgate's timers (here hyper's, as the proxy gives hyper) fire at their deadlines,
//! not before, and a reset moves them.

use std::time::{Duration, Instant};

use hyper::rt::Timer;
use streamgate::timers::{spawn_thread, HyperTimer};

#[test]
fn timers_fire_on_a_runtime_without_a_time_driver() {
    spawn_thread().expect("timer thread");
    spawn_thread().expect("a second call is a no-op");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .unwrap();
    rt.block_on(async {
        // A sleep: not before its deadline, and woken by the timer thread (nothing else would wake
        // this runtime, which has no other task and no socket).
        let start = Instant::now();
        HyperTimer.sleep(Duration::from_millis(50)).await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(50), "woke after {took:?}");
        assert!(took < Duration::from_secs(5), "woke after {took:?}");

        // A deadline an hour away, reset to 30 ms from now: it fires at the new one.
        let start = Instant::now();
        let mut sleep = HyperTimer.sleep_until(start + Duration::from_secs(3600));
        HyperTimer.reset(&mut sleep, start + Duration::from_millis(30));
        sleep.await;
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(30), "woke after {took:?}");
        assert!(took < Duration::from_secs(5), "woke after {took:?}");

        // Many at once, from tasks of this runtime: each wakes its own task.
        let tasks: Vec<_> = (1..=20u64)
            .map(|i| {
                tokio::spawn(async move {
                    let start = Instant::now();
                    HyperTimer.sleep(Duration::from_millis(i * 5)).await;
                    start.elapsed() >= Duration::from_millis(i * 5)
                })
            })
            .collect();
        for t in tasks {
            assert!(t.await.unwrap(), "a timer fired early");
        }
    });
}
