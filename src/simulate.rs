//! `simulate`: a black-box caller that behaves like Asterisk's AudioSocket application. It
//! sends the id frame, streams WAV files as real-time-paced 20 ms slin frames with silence
//! frames in between, waits for each reply, records what the agent sent at its true timing and
//! reports latencies and pacing. It can also replay a raw capture of a real Asterisk call.

use crate::audio::{bytes_to_samples, resample_all, rms_dbfs};
use crate::audiosocket::{connection, AudioRate, Frame};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::time::MissedTickBehavior;
use uuid::Uuid;

/// Arguments of `simulate`.
#[derive(Debug, Clone, clap::Args)]
pub struct SimulateArgs {
    /// The AudioSocket server, HOST:PORT.
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub server: String,
    /// A caller utterance (WAV, any rate, mono or the first channel); repeat for several turns.
    #[arg(long = "wav")]
    pub wavs: Vec<PathBuf>,
    /// Replay a raw capture of Asterisk's side of a call (e.g. shared/audiosocket/*.bin),
    /// paced by the per-frame times in the `.json` beside it when there is one.
    #[arg(long, conflicts_with = "wavs")]
    pub replay: Option<PathBuf>,
    /// Write everything the agent sent, at its true timing, to this WAV file.
    #[arg(long)]
    pub record: Option<PathBuf>,
    /// Print one JSON object instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// The call's sample rate in Hz: 8000 sends kind 0x10 (the `AudioSocket()` application),
    /// 16000 kind 0x12 (the channel driver with `c(slin16)`).
    #[arg(long, default_value_t = 8000)]
    pub rate: u32,
    /// Agent silence (ms) after which its greeting or reply counts as finished. The default,
    /// 3000, is longer than the agent's longest silence while a reply is pending (the dead-air
    /// policy's `call.second_filler_after_ms`, 2500), so like a real caller the simulated one
    /// waits through "One moment." for the reply instead of hanging up after the filler.
    #[arg(long, default_value_t = 3000)]
    pub reply_end_ms: u64,
    /// Longest wait (ms) for a reply to start after an utterance; then it is `null`.
    #[arg(long, default_value_t = 15000)]
    pub reply_timeout_ms: u64,
    /// Longest wait (ms) for the greeting to start.
    #[arg(long, default_value_t = 5000)]
    pub greeting_timeout_ms: u64,
    /// Barge-in mode: start each utterance this many ms after the agent's greeting or previous
    /// reply started, instead of waiting for it to finish; the report then gives the stop
    /// latency (`barge_in_stop_ms`). The last reply is awaited as usual.
    #[arg(long)]
    pub barge_in_after_ms: Option<u64>,
    /// Stay on the line, silent, this many ms after the last reply (or after the greeting
    /// when no WAV is given), unless the agent ends the call first. With `--replay`: this many
    /// ms before the capture's closing hangup frame (a caller who waits for the answer).
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    /// Agent frames quieter than this RMS level (dBFS) count as silence; caller frames quieter
    /// than this mark the end of an utterance.
    #[arg(long, default_value_t = -50.0, allow_hyphen_values = true)]
    pub silence_dbfs: f32,
}

/// The report `simulate --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The UUID sent in the id frame.
    pub call_id: String,
    /// Id frame -> first non-silent agent frame, ms; `null` if none came.
    pub greeting_ms: Option<f64>,
    /// One entry per WAV.
    pub turns: Vec<TurnReport>,
    /// Agent frames received.
    pub agent_frames: usize,
    /// Gaps between consecutive agent frames.
    pub pacing: Pacing,
    /// `caller` (we closed), `agent_hangup` (0x00 received), `server_close` (EOF first) or
    /// `error: ...`.
    pub ended_by: String,
}

/// One caller utterance and the agent's answer.
#[derive(Debug, Clone, Serialize)]
pub struct TurnReport {
    /// The WAV played.
    pub wav: String,
    /// End of the caller's speech (last frame above `silence_dbfs`) -> first non-silent agent
    /// frame, ms; `null` when no reply came.
    pub voice_to_voice_ms: Option<f64>,
    /// First to last non-silent agent frame of the reply, ms; `null` when no reply came.
    pub reply_audio_ms: Option<f64>,
    /// With `--barge-in-after-ms`: from this utterance's first speech frame to the last
    /// non-silent agent frame before the agent fell silent; `null` when the agent was not
    /// talking as the utterance started.
    pub barge_in_stop_ms: Option<f64>,
}

/// Inter-arrival gaps of agent frames, ms.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pacing {
    /// Mean gap.
    pub mean_gap_ms: f64,
    /// 99th percentile gap.
    pub p99_gap_ms: f64,
    /// Largest gap.
    pub max_gap_ms: f64,
}

/// Runs the subcommand: prints the report, exit status 0 unless the call could not be made.
pub fn run(args: SimulateArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = rt.block_on(simulate(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        println!("call {} ended by {}", report.call_id, report.ended_by);
        println!("greeting: {}", fmt_ms(report.greeting_ms));
        for t in &report.turns {
            println!(
                "{}: voice-to-voice {}, reply {}",
                t.wav,
                fmt_ms(t.voice_to_voice_ms),
                fmt_ms(t.reply_audio_ms)
            );
        }
        let p = &report.pacing;
        println!(
            "{} agent frames, gap mean {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            report.agent_frames, p.mean_gap_ms, p.p99_gap_ms, p.max_gap_ms
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn fmt_ms(v: Option<f64>) -> String {
    v.map_or("none".into(), |v| format!("{v:.0} ms"))
}

/// One frame the agent sent.
struct Received {
    /// ms since the id frame was sent.
    at_ms: f64,
    rate: AudioRate,
    samples: Vec<i16>,
    voiced: bool,
}

#[derive(Default)]
struct Inbox {
    frames: Vec<Received>,
    ended: Option<String>,
}

impl Inbox {
    fn last_voiced_ms(&self) -> Option<f64> {
        self.frames.iter().rev().find(|f| f.voiced).map(|f| f.at_ms)
    }
    /// The last non-silent agent frame in `[from, until)` that is followed by at least 200 ms of
    /// agent silence (or is the last one before `until`): where the agent stopped.
    fn last_voiced_in(&self, from: f64, until: f64) -> Option<f64> {
        let voiced: Vec<f64> = self
            .frames
            .iter()
            .filter(|f| f.voiced && f.at_ms >= from && f.at_ms < until)
            .map(|f| f.at_ms)
            .collect();
        let first_gap = voiced.windows(2).find(|w| w[1] - w[0] > 200.0).map(|w| w[0]);
        first_gap.or_else(|| voiced.last().copied())
    }

    fn first_voiced_after(&self, t: f64) -> Option<f64> {
        self.frames.iter().find(|f| f.voiced && f.at_ms > t).map(|f| f.at_ms)
    }
}

/// Makes one simulated call and returns its report.
pub async fn simulate(args: &SimulateArgs) -> Result<Report> {
    let Some(rate) = AudioRate::from_hz(args.rate) else {
        bail!("--rate {} is not an AudioSocket rate", args.rate)
    };
    let stream = TcpStream::connect(&args.server)
        .await
        .with_context(|| format!("cannot connect to {}", args.server))?;
    let (mut reader, mut writer) = connection::split(stream);
    let mut call_id = Uuid::new_v4();
    let inbox = Arc::new(Mutex::new(Inbox::default()));
    let t0 = Instant::now();
    let silence_dbfs = args.silence_dbfs;
    let receiver = {
        let inbox = inbox.clone();
        tokio::spawn(async move {
            loop {
                let frame = reader.read_frame().await;
                let mut ib = inbox.lock().unwrap();
                match frame {
                    Ok(Some(Frame::Audio { rate, payload })) => {
                        let mut samples = Vec::with_capacity(payload.len() / 2);
                        bytes_to_samples(&payload, &mut samples);
                        let voiced = rms_dbfs(&samples) > silence_dbfs;
                        ib.frames.push(Received {
                            at_ms: t0.elapsed().as_secs_f64() * 1000.0,
                            rate,
                            samples,
                            voiced,
                        });
                    }
                    Ok(Some(Frame::Hangup)) => {
                        ib.ended.get_or_insert("agent_hangup".into());
                    }
                    Ok(Some(other)) => {
                        ib.ended.get_or_insert(format!("error: agent sent {other}"));
                        return;
                    }
                    Ok(None) => {
                        ib.ended.get_or_insert("server_close".into());
                        return;
                    }
                    Err(e) => {
                        ib.ended.get_or_insert(format!("error: {e}"));
                        return;
                    }
                }
            }
        })
    };

    let mut turns = Vec::new();
    if let Some(capture) = &args.replay {
        call_id = replay(capture, &mut writer, &inbox, args.hold_ms, t0).await?;
    } else {
        writer.write_frame(&Frame::Id(call_id)).await?;
        let mut caller = Pacer::new(rate);
        // Listen to the greeting before speaking, like a polite caller.
        let greeting_deadline = Duration::from_millis(args.greeting_timeout_ms);
        caller
            .silence_until(
                &mut writer,
                &inbox,
                |ib, now| {
                    let started = ib.first_voiced_after(-1.0);
                    match started {
                        None => now > greeting_deadline.as_secs_f64() * 1000.0,
                        // Barge-in mode: the first utterance interrupts the greeting.
                        Some(s) if args.barge_in_after_ms.is_some() => {
                            now - s >= args.barge_in_after_ms.unwrap() as f64
                        }
                        Some(_) => ib.last_voiced_ms().is_some_and(|l| now - l > args.reply_end_ms as f64),
                    }
                },
                t0,
            )
            .await?;
        // (wav, speech onset, speech end) of each utterance, in ms since the id frame.
        let mut said = Vec::new();
        for (i, wav) in args.wavs.iter().enumerate() {
            let samples = read_wav(wav, rate.hz())?;
            let (onset, speech_end) = caller.play(&mut writer, &samples, silence_dbfs, t0).await?;
            said.push((wav.display().to_string(), onset, speech_end));
            let reply_deadline = speech_end + args.reply_timeout_ms as f64;
            let barge_in = args
                .barge_in_after_ms
                .filter(|_| i + 1 < args.wavs.len())
                .map(|ms| ms as f64);
            caller
                .silence_until(
                    &mut writer,
                    &inbox,
                    |ib, now| match ib.first_voiced_after(speech_end) {
                        None => now > reply_deadline || ib.ended.is_some(),
                        // Barge-in mode: the next utterance starts this long into the reply.
                        Some(start) if barge_in.is_some() => now - start >= barge_in.unwrap(),
                        Some(_) => ib.last_voiced_ms().is_some_and(|l| now - l > args.reply_end_ms as f64),
                    },
                    t0,
                )
                .await?;
        }
        if args.hold_ms > 0 {
            let until = t0.elapsed().as_secs_f64() * 1000.0 + args.hold_ms as f64;
            caller
                .silence_until(&mut writer, &inbox, |_, now| now >= until, t0)
                .await?;
        }
        let ib = inbox.lock().unwrap();
        for (k, (wav, _onset, speech_end)) in said.iter().enumerate() {
            // This reply's audio runs until the next utterance ends (a barge-in cuts it before).
            let until = said.get(k + 1).map_or(f64::INFINITY, |n| n.2);
            let start = ib.first_voiced_after(*speech_end).filter(|s| *s < until);
            let end = start.and_then(|s| ib.last_voiced_in(s, until));
            // Barge-in stop latency: from this utterance's first speech frame to the last agent
            // frame of the previous reply, when the agent was talking at that moment.
            let stop = args
                .barge_in_after_ms
                .and_then(|_| ib.last_voiced_in(said[k].1 - 20.0, said[k].2))
                .map(|t| t - said[k].1);
            turns.push(TurnReport {
                wav: wav.clone(),
                voice_to_voice_ms: start.map(|s| s - speech_end),
                reply_audio_ms: start.zip(end).map(|(s, e)| e - s + 20.0),
                barge_in_stop_ms: stop,
            });
        }
    }
    // Hang up like a caller: a plain close.
    inbox.lock().unwrap().ended.get_or_insert("caller".into());
    let _ = writer.shutdown().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), receiver).await;
    let ib = inbox.lock().unwrap();
    if let Some(path) = &args.record {
        write_recording(path, &ib.frames)?;
    }
    Ok(Report {
        call_id: call_id.to_string(),
        greeting_ms: ib.first_voiced_after(-1.0),
        turns,
        agent_frames: ib.frames.len(),
        pacing: pacing(&ib.frames),
        ended_by: ib.ended.clone().unwrap_or_else(|| "caller".into()),
    })
}

/// Sends caller frames at real time: one 20 ms frame every 20 ms.
struct Pacer {
    rate: AudioRate,
    tick: tokio::time::Interval,
    silence: Vec<i16>,
}

impl Pacer {
    fn new(rate: AudioRate) -> Pacer {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
        Pacer {
            rate,
            tick,
            silence: vec![0; rate.samples_per_20ms()],
        }
    }

    /// Streams `samples`; returns the send times (ms since `t0`) of the first and the last
    /// frame louder than `silence_dbfs`: the start and the end of the caller's speech.
    async fn play<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        w: &mut connection::FrameWriter<W>,
        samples: &[i16],
        silence_dbfs: f32,
        t0: Instant,
    ) -> Result<(f64, f64)> {
        let mut onset = None;
        let mut speech_end = t0.elapsed().as_secs_f64() * 1000.0;
        for chunk in samples.chunks(self.rate.samples_per_20ms()) {
            self.tick.tick().await;
            let now = t0.elapsed().as_secs_f64() * 1000.0;
            if w.write_samples(self.rate, chunk).await.is_err() {
                break; // the agent ended the call while the caller spoke
            }
            if rms_dbfs(chunk) > silence_dbfs {
                onset.get_or_insert(now);
                speech_end = now;
            }
        }
        Ok((onset.unwrap_or(speech_end), speech_end))
    }

    /// Sends silence frames until `done(inbox, now_ms)` is true or the agent ends the call.
    async fn silence_until<W: tokio::io::AsyncWrite + Unpin>(
        &mut self,
        w: &mut connection::FrameWriter<W>,
        inbox: &Mutex<Inbox>,
        done: impl Fn(&Inbox, f64) -> bool,
        t0: Instant,
    ) -> Result<()> {
        loop {
            self.tick.tick().await;
            {
                let ib = inbox.lock().unwrap();
                if ib.ended.is_some() || done(&ib, t0.elapsed().as_secs_f64() * 1000.0) {
                    return Ok(());
                }
            }
            if w.write_samples(self.rate, &self.silence).await.is_err() {
                return Ok(());
            }
        }
    }
}

/// Replays a raw capture byte-exactly, frame by frame, at the times in its `.json` (or one
/// frame per 20 ms of audio when there is none).
/// With `hold_ms` > 0 a closing hangup frame is held back: the line stays open (20 ms frames
/// of silence at the capture's last audio rate) until the agent ends the call or `hold_ms`
/// pass, then the hangup is sent.
/// Returns the UUID of the capture's id frame.
async fn replay<W: tokio::io::AsyncWrite + Unpin>(
    capture: &Path,
    w: &mut connection::FrameWriter<W>,
    inbox: &Mutex<Inbox>,
    hold_ms: u64,
    t0: Instant,
) -> Result<Uuid> {
    let bytes = std::fs::read(capture).with_context(|| format!("cannot read capture {}", capture.display()))?;
    let mut buf = bytes::BytesMut::from(&bytes[..]);
    let mut frames = Vec::new();
    while let Some(f) = Frame::parse(&mut buf).with_context(|| format!("bad frame in {}", capture.display()))? {
        frames.push(f);
    }
    anyhow::ensure!(buf.is_empty(), "{} ends with a truncated frame", capture.display());
    let Some(Frame::Id(id)) = frames.first() else {
        bail!("{} does not start with an id frame", capture.display())
    };
    let id = *id;
    let times = capture_times(capture)?;
    let closing = if hold_ms > 0 && matches!(frames.last(), Some(Frame::Hangup)) {
        frames.pop()
    } else {
        None
    };
    let start = tokio::time::Instant::now();
    let mut t = 0.0f64;
    for (i, f) in frames.iter().enumerate() {
        t = match &times {
            Some(ts) => ts.get(i).copied().unwrap_or(t),
            None => {
                t + match f {
                    Frame::Audio { rate, payload } => payload.len() as f64 / 2.0 / rate.hz() as f64,
                    _ => 0.0,
                }
            }
        };
        tokio::time::sleep_until(start + Duration::from_secs_f64(t)).await;
        if inbox.lock().unwrap().ended.is_some() {
            break;
        }
        if w.write_frame(f).await.is_err() {
            return Ok(id);
        }
    }
    if let Some(hangup) = closing {
        let rate = frames
            .iter()
            .rev()
            .find_map(|f| match f {
                Frame::Audio { rate, .. } => Some(*rate),
                _ => None,
            })
            .unwrap_or(AudioRate::Slin8);
        let until = t0.elapsed().as_secs_f64() * 1000.0 + hold_ms as f64;
        Pacer::new(rate)
            .silence_until(w, inbox, |_, now| now >= until, t0)
            .await?;
        if inbox.lock().unwrap().ended.is_none() {
            let _ = w.write_frame(&hangup).await;
        }
    }
    Ok(id)
}

/// Per-frame send times (s) from the capture's `.json` (`frames: [[t, kind, len, ...], ...]`).
fn capture_times(capture: &Path) -> Result<Option<Vec<f64>>> {
    let json = capture.with_extension("json");
    let Ok(text) = std::fs::read_to_string(&json) else {
        return Ok(None);
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", json.display()))?;
    let Some(frames) = v.get("frames").and_then(|f| f.as_array()) else {
        return Ok(None);
    };
    Ok(Some(frames.iter().filter_map(|f| f.get(0)?.as_f64()).collect()))
}

/// Reads a WAV as mono i16 at `rate_hz`.
pub fn read_wav(path: &Path, rate_hz: u32) -> Result<Vec<i16>> {
    let mut r = hound::WavReader::open(path).with_context(|| format!("cannot read WAV {}", path.display()))?;
    let spec = r.spec();
    let ch = spec.channels as usize;
    let all: Vec<i16> = match (spec.sample_format, spec.bits_per_sample) {
        (hound::SampleFormat::Int, 16) => r.samples::<i16>().collect::<Result<_, _>>()?,
        (hound::SampleFormat::Int, b) => r
            .samples::<i32>()
            .map(|s| s.map(|s| (s >> (b - 16).max(0)) as i16))
            .collect::<Result<_, _>>()?,
        (hound::SampleFormat::Float, _) => r
            .samples::<f32>()
            .map(|s| s.map(|s| (s * 32767.0) as i16))
            .collect::<Result<_, _>>()?,
    };
    let mono: Vec<i16> = all.chunks(ch).map(|c| c[0]).collect();
    resample_all(&mono, spec.sample_rate, rate_hz)
}

fn write_recording(path: &Path, frames: &[Received]) -> Result<()> {
    let rate = frames.first().map_or(8000, |f| f.rate.hz());
    let mut out: Vec<i16> = Vec::new();
    for f in frames {
        let at = (f.at_ms / 1000.0 * rate as f64) as usize;
        if out.len() < at {
            out.resize(at, 0);
        }
        if f.rate.hz() == rate {
            out.extend_from_slice(&f.samples);
        } else {
            out.extend(resample_all(&f.samples, f.rate.hz(), rate)?);
        }
    }
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).with_context(|| format!("cannot write {}", path.display()))?;
    for s in out {
        w.write_sample(s)?;
    }
    w.finalize()?;
    Ok(())
}

fn pacing(frames: &[Received]) -> Pacing {
    let mut gaps: Vec<f64> = frames.windows(2).map(|w| w[1].at_ms - w[0].at_ms).collect();
    if gaps.is_empty() {
        return Pacing::default();
    }
    let mean = gaps.iter().sum::<f64>() / gaps.len() as f64;
    gaps.sort_by(|a, b| a.total_cmp(b));
    let p99 = gaps[((gaps.len() as f64 * 0.99).ceil() as usize)
        .saturating_sub(1)
        .min(gaps.len() - 1)];
    Pacing {
        mean_gap_ms: mean,
        p99_gap_ms: p99,
        max_gap_ms: *gaps.last().unwrap(),
    }
}
