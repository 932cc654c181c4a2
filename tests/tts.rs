//! The Piper engine's synthesis workers with the real test voice (issue 10): several workers
//! synthesize sentences of different calls at once, and with `tts.order = "deadline"` a
//! sentence due now goes ahead of one due later, while `fifo` keeps arrival order.

mod common;

use asterisk_voice_agent::config::TtsOrder;
use asterisk_voice_agent::tts::{TtsEngine, TtsSettings};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Long enough that its synthesis (about 0.5-1 s on 2 cores) outlasts a thread's wake-up.
const LONG: &str = "Our office is open from nine in the morning until five in the afternoon, Monday \
                    to Friday, and on Saturday mornings from ten until one.";

fn engine(workers: usize, order: TtsOrder) -> Arc<TtsEngine> {
    Arc::new(common::test_voice(TtsSettings {
        length_scale: None,
        gain: 1.0,
        threads: 1,
        memory_arena: false,
        workers,
        order,
        nice: 10,
    }))
}

/// Two long sentences asked for together: with two workers the second does not wait for the
/// first to be synthesized; with one it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_synthesize_two_sentences_at_once() {
    for workers in [2, 1] {
        let tts = engine(workers, TtsOrder::Fifo);
        assert_eq!(tts.workers, workers);
        let (a, b) = tokio::join!(tts.synthesize(LONG, 8000), tts.synthesize(LONG, 8000));
        let (a, b) = (a.expect("synthesis"), b.expect("synthesis"));
        assert!(
            a.samples.len() > 8000 * 4,
            "{} samples: the sentence is several seconds long",
            a.samples.len()
        );
        let (first, second) = if a.wait_ms <= b.wait_ms { (a, b) } else { (b, a) };
        println!(
            "workers {workers}: waits {} and {} ms, syntheses {} and {} ms",
            first.wait_ms, second.wait_ms, first.synth_ms, second.synth_ms
        );
        if workers == 2 {
            assert!(
                second.wait_ms < first.synth_ms / 2,
                "with two workers the second sentence waited {} ms, the first took {} ms",
                second.wait_ms,
                first.synth_ms
            );
        } else {
            assert!(
                second.wait_ms >= first.synth_ms * 9 / 10,
                "with one worker the second sentence waited only {} ms, the first took {} ms",
                second.wait_ms,
                first.synth_ms
            );
        }
    }
}

/// One worker busy with a long sentence; meanwhile a later sentence of one call (due in 10 s)
/// and then a first sentence of another (due now) queue. `deadline` synthesizes the first
/// sentence before the later one, `fifo` the other way round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sentence_due_now_goes_before_one_due_later() {
    for (order, expect_first) in [(TtsOrder::Deadline, "due now"), (TtsOrder::Fifo, "due later")] {
        let tts = engine(1, order);
        let busy = {
            let tts = tts.clone();
            tokio::spawn(async move { tts.synthesize(LONG, 8000).await })
        };
        // The worker has taken the long sentence (it is the only one queued either way).
        tokio::time::sleep(Duration::from_millis(50)).await;
        let done = Arc::new(std::sync::Mutex::new(Vec::new()));
        let later = {
            let (tts, done) = (tts.clone(), done.clone());
            tokio::spawn(async move {
                let s = tts
                    .synthesize_by(
                        "And we are closed on Sundays.",
                        8000,
                        Instant::now() + Duration::from_secs(10),
                    )
                    .await;
                done.lock().unwrap().push("due later");
                s
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = {
            let (tts, done) = (tts.clone(), done.clone());
            tokio::spawn(async move {
                let s = tts.synthesize("Hello, how can I help?", 8000).await;
                done.lock().unwrap().push("due now");
                s
            })
        };
        let busy = busy.await.unwrap().expect("synthesis");
        later.await.unwrap().expect("synthesis");
        now.await.unwrap().expect("synthesis");
        let done = done.lock().unwrap().clone();
        println!("{order:?}: the long sentence took {} ms, then {done:?}", busy.synth_ms);
        assert_eq!(done[0], expect_first, "{order:?}: order of completion {done:?}");
    }
}
