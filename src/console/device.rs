//! The machine's microphone and speakers as a call transport, with cpal: opens the capture and
//! playback devices at whatever rate and sample format they offer, and converts with rubato
//! ([`StreamResampler`]) to and from the call's 16 kHz slin.
//!
//! The audio callbacks run on cpal's threads and never block or allocate: the capture callback
//! mixes each device frame to mono and pushes it into a lock-free ring ([`rtrb`]); the playback
//! callback pops from another. The call side ([`ConsoleInput`], [`ConsoleOutput`]) does the
//! resampling, cuts the microphone audio into 20 ms frames, gates the agent's echo
//! ([`super::echo`]) and notices a failed or unplugged device (an error from the callback, or a
//! microphone that stops delivering audio), which ends the call with a message.

use super::echo::{EchoGate, EchoReference};
use crate::audio::{rms_dbfs, StreamResampler};
use crate::audiosocket::{AudioRate, ConnectionError, Frame};
use crate::transport::{CallInput, CallOutput};
use anyhow::{anyhow, bail, Result};
use bytes::{BufMut, BytesMut};
use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{FromSample, SampleFormat, SizedSample, StreamConfig, SupportedStreamConfig};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The call's audio rate on the console: 16 kHz slin (Vosk hears it better than 8 kHz).
pub const CALL_RATE: AudioRate = AudioRate::Slin16;

/// Rates tried, best first, when a device's default configuration cannot be opened (Hz).
const PREFERRED_RATES: [u32; 6] = [48000, 44100, 16000, 32000, 22050, 8000];

/// Microphone audio the capture ring holds before the newest samples are dropped (ms).
const CAPTURE_RING_MS: u32 = 1000;

/// Agent audio the playback ring holds at most (ms): the bound on what a call can queue.
const PLAYBACK_RING_MS: u32 = 500;

/// Playback buffered before the speaker starts (again, after running dry), in ms: enough to
/// ride out the call's 20 ms pacing jitter.
const PLAYBACK_PREFILL_MS: u32 = 60;

/// Above this much buffered playback (ms) silence frames are dropped: the call's timer and the
/// sound card's clock drift apart, and this keeps the latency bounded.
const PLAYBACK_HIGH_WATER_MS: u32 = 140;

/// A microphone that delivers nothing for this long is gone (ms).
const INPUT_STALL_MS: u64 = 2000;

/// Muted microphone frames louder than this (dBFS) are counted in [`ConsoleInput::gated_frames`]
/// (the VAD's default energy floor: quieter frames were never speech anyway).
const MUTED_COUNT_FLOOR_DBFS: f32 = -70.0;

/// How often the call side looks for new microphone audio (ms).
const POLL_MS: u64 = 5;

/// Capture or playback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// The microphone.
    Input,
    /// The speakers.
    Output,
}

impl Direction {
    fn noun(self) -> &'static str {
        match self {
            Direction::Input => "input (microphone)",
            Direction::Output => "output (speaker)",
        }
    }
}

/// What a device's callbacks report to the call side. Written by cpal's error callback (not
/// a real-time callback: it may lock).
#[derive(Debug, Default)]
struct DeviceStatus {
    failed: AtomicBool,
    message: Mutex<Option<String>>,
}

impl DeviceStatus {
    fn fail(&self, msg: String) {
        let mut m = self.message.lock().unwrap_or_else(|e| e.into_inner());
        if m.is_none() {
            *m = Some(msg);
        }
        self.failed.store(true, Ordering::Release);
    }

    fn error(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.message.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// One line per device of the default host: name, default marks and the formats it offers.
pub fn list_devices() -> Result<String> {
    let host = cpal::default_host();
    let mut out = String::new();
    for dir in [Direction::Input, Direction::Output] {
        let default = match dir {
            Direction::Input => host.default_input_device(),
            Direction::Output => host.default_output_device(),
        }
        .and_then(|d| d.name().ok());
        let _ = writeln!(out, "{} devices ({} host):", dir.noun(), host.id().name());
        let devices = match dir {
            Direction::Input => host.input_devices().map(|d| d.collect::<Vec<_>>()),
            Direction::Output => host.output_devices().map(|d| d.collect::<Vec<_>>()),
        }
        .map_err(|e| anyhow!("cannot list the {} devices: {e}", dir.noun()))?;
        if devices.is_empty() {
            let _ = writeln!(out, "  (none)");
        }
        for d in devices {
            let name = d.name().unwrap_or_else(|e| format!("<unnamed: {e}>"));
            let mark = if default.as_deref() == Some(name.as_str()) {
                " (default)"
            } else {
                ""
            };
            let formats = supported(&d, dir)
                .map(|v| summarize(&v))
                .unwrap_or_else(|e| format!("formats unavailable: {e}"));
            let _ = writeln!(out, "  {name}{mark}: {formats}");
        }
    }
    Ok(out)
}

/// `f32/i16, 1-2 channels, 8000-48000 Hz` for a device's configuration ranges.
fn summarize(ranges: &[cpal::SupportedStreamConfigRange]) -> String {
    if ranges.is_empty() {
        return "no formats".into();
    }
    let mut formats: Vec<String> = Vec::new();
    for r in ranges {
        let f = r.sample_format().to_string();
        if !formats.contains(&f) {
            formats.push(f);
        }
    }
    let ch = |f: fn(u16, u16) -> u16| ranges.iter().map(|r| r.channels()).reduce(f).unwrap_or(0);
    let lo = ranges.iter().map(|r| r.min_sample_rate().0).min().unwrap_or(0);
    let hi = ranges.iter().map(|r| r.max_sample_rate().0).max().unwrap_or(0);
    format!(
        "{}, {}-{} channels, {lo}-{hi} Hz",
        formats.join("/"),
        ch(u16::min),
        ch(u16::max)
    )
}

fn supported(d: &cpal::Device, dir: Direction) -> Result<Vec<cpal::SupportedStreamConfigRange>> {
    Ok(match dir {
        Direction::Input => d.supported_input_configs()?.collect(),
        Direction::Output => d.supported_output_configs()?.collect(),
    })
}

/// The named device, or the default one.
///
/// # Errors
/// No default device ("no input device"), or no device of that name (the message lists the
/// devices there are).
pub fn find_device(dir: Direction, name: Option<&str>) -> Result<cpal::Device> {
    let host = cpal::default_host();
    let Some(name) = name else {
        let d = match dir {
            Direction::Input => host.default_input_device(),
            Direction::Output => host.default_output_device(),
        };
        return d.ok_or_else(|| {
            anyhow!(
                "no {} device: this machine has none (see `console --list-devices`, or use a headset)",
                dir.noun()
            )
        });
    };
    let devices: Vec<cpal::Device> = match dir {
        Direction::Input => host.input_devices().map(|d| d.collect()),
        Direction::Output => host.output_devices().map(|d| d.collect()),
    }
    .unwrap_or_default();
    let names: Vec<String> = devices.iter().filter_map(|d| d.name().ok()).collect();
    devices
        .into_iter()
        .find(|d| d.name().ok().as_deref() == Some(name))
        .ok_or_else(|| {
            anyhow!(
                "no {} device named {name:?}; there are: {} (see `console --list-devices`)",
                dir.noun(),
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            )
        })
}

/// The configurations to try on a device, best first: its default, then each format it
/// offers at the preferred rates within its range.
fn candidates(d: &cpal::Device, dir: Direction) -> Vec<SupportedStreamConfig> {
    let mut out = Vec::new();
    let default = match dir {
        Direction::Input => d.default_input_config(),
        Direction::Output => d.default_output_config(),
    };
    if let Ok(c) = default {
        out.push(c);
    }
    if let Ok(ranges) = supported(d, dir) {
        for rate in PREFERRED_RATES {
            for r in &ranges {
                if (r.min_sample_rate().0..=r.max_sample_rate().0).contains(&rate) {
                    out.push(r.clone().with_sample_rate(cpal::SampleRate(rate)));
                }
            }
        }
        for r in ranges {
            out.push(r.with_max_sample_rate());
        }
    }
    out.dedup_by(|a, b| a == b);
    out
}

/// Opens a stream on the first configuration the device accepts.
fn open<S>(
    d: &cpal::Device,
    dir: Direction,
    mut build: impl FnMut(&SupportedStreamConfig) -> Result<(cpal::Stream, S), String>,
) -> Result<(cpal::Stream, S, SupportedStreamConfig)> {
    let name = d.name().unwrap_or_else(|_| "?".into());
    let mut tried = Vec::new();
    for c in candidates(d, dir) {
        match build(&c) {
            Ok((stream, state)) => match stream.play() {
                Ok(()) => return Ok((stream, state, c)),
                Err(e) => tried.push(format!(
                    "{} Hz {}ch {}: {e}",
                    c.sample_rate().0,
                    c.channels(),
                    c.sample_format()
                )),
            },
            Err(e) => tried.push(format!(
                "{} Hz {}ch {}: {e}",
                c.sample_rate().0,
                c.channels(),
                c.sample_format()
            )),
        }
    }
    if tried.is_empty() {
        bail!(
            "the {} device {name:?} offers no audio format at all (is it in use or unplugged?)",
            dir.noun()
        );
    }
    bail!(
        "the {} device {name:?} refused every rate and format tried: {}",
        dir.noun(),
        tried.join("; ")
    )
}

/// Runs `$body` with `$t` bound to the Rust sample type of `$fmt`.
macro_rules! with_sample_type {
    ($fmt:expr, $t:ident, $body:expr) => {
        match $fmt {
            SampleFormat::I8 => {
                type $t = i8;
                $body
            }
            SampleFormat::I16 => {
                type $t = i16;
                $body
            }
            SampleFormat::I32 => {
                type $t = i32;
                $body
            }
            SampleFormat::I64 => {
                type $t = i64;
                $body
            }
            SampleFormat::U8 => {
                type $t = u8;
                $body
            }
            SampleFormat::U16 => {
                type $t = u16;
                $body
            }
            SampleFormat::U32 => {
                type $t = u32;
                $body
            }
            SampleFormat::U64 => {
                type $t = u64;
                $body
            }
            SampleFormat::F32 => {
                type $t = f32;
                $body
            }
            SampleFormat::F64 => {
                type $t = f64;
                $body
            }
            other => Err(format!("sample format {other} not handled")),
        }
    };
}

/// The open microphone: the stream (kept alive here, on the thread that opened it: cpal
/// streams are not `Send`) and its description.
pub struct Capture {
    _stream: cpal::Stream,
    /// `NAME at RATE Hz, N channels, FORMAT`.
    pub description: String,
}

/// The open speaker.
pub struct Playback {
    _stream: cpal::Stream,
    /// `NAME at RATE Hz, N channels, FORMAT`.
    pub description: String,
}

fn describe(d: &cpal::Device, c: &SupportedStreamConfig) -> String {
    format!(
        "{} at {} Hz, {} channel(s), {}",
        d.name().unwrap_or_else(|_| "?".into()),
        c.sample_rate().0,
        c.channels(),
        c.sample_format()
    )
}

/// Opens the microphone `name` (default: the default input device) and returns the stream and
/// the call's side of it, which yields the id frame, then 16 kHz 20 ms audio frames.
/// `hangup` set by Ctrl-C makes it yield `hangup_key` once (a DTMF digit bound to `hangup`).
///
/// # Errors
/// No such device, or one that refuses every rate and format ([`find_device`]).
pub fn open_input(
    name: Option<&str>,
    gate: EchoGate,
    reference: Arc<EchoReference>,
    hangup: Arc<AtomicBool>,
    hangup_key: char,
) -> Result<(Capture, ConsoleInput)> {
    let d = find_device(Direction::Input, name)?;
    let status = Arc::new(DeviceStatus::default());
    let (stream, consumer, c) = open(&d, Direction::Input, |c| {
        let cfg: StreamConfig = c.config();
        let cap = (cfg.sample_rate.0 * CAPTURE_RING_MS / 1000) as usize;
        let (producer, consumer) = rtrb::RingBuffer::<f32>::new(cap);
        let st = status.clone();
        let stream = with_sample_type!(
            c.sample_format(),
            T,
            build_input::<T>(&d, &cfg, producer, st, reference.clone())
        )?;
        Ok((stream, consumer))
    })?;
    let rate = c.sample_rate().0;
    let description = describe(&d, &c);
    let resampler =
        StreamResampler::new(rate, CALL_RATE.hz(), 20).map_err(|e| anyhow!("resampler {rate} Hz -> 16 kHz: {e}"))?;
    Ok((
        Capture {
            _stream: stream,
            description: description.clone(),
        },
        ConsoleInput {
            id: Some(uuid::Uuid::new_v4()),
            ring: consumer,
            resampler,
            scratch: Vec::with_capacity(rate as usize / 10),
            pending: Vec::with_capacity(CALL_RATE.hz() as usize / 5),
            status,
            hangup,
            hangup_key,
            hangup_sent: false,
            last_audio: Instant::now(),
            gate,
            reference,
            gated_frames: Arc::new(AtomicU64::new(0)),
            frames: 0,
            name: description,
        },
    ))
}

fn build_input<T>(
    d: &cpal::Device,
    cfg: &StreamConfig,
    mut ring: rtrb::Producer<f32>,
    status: Arc<DeviceStatus>,
    reference: Arc<EchoReference>,
) -> Result<cpal::Stream, String>
where
    T: SizedSample,
    f32: FromSample<T>,
{
    let channels = cfg.channels.max(1) as usize;
    let scale = 1.0 / channels as f32;
    d.build_input_stream(
        cfg,
        move |data: &[T], info: &cpal::InputCallbackInfo| {
            let ts = info.timestamp();
            if let Some(lat) = ts.callback.duration_since(&ts.capture) {
                reference.set_input_latency(lat);
            }
            for frame in data.chunks(channels) {
                let sum: f32 = frame.iter().map(|s| s.to_sample::<f32>()).sum();
                // A full ring means the call side stopped reading: drop the newest.
                let _ = ring.push(sum * scale);
            }
        },
        move |e| status.fail(format!("{e}")),
        None,
    )
    .map_err(|e| e.to_string())
}

/// Opens the speaker `name` (default: the default output device) and returns the stream and
/// the call's side of it, which plays 20 ms frames at any AudioSocket rate.
///
/// # Errors
/// No such device, or one that refuses every rate and format.
pub fn open_output(name: Option<&str>, reference: Arc<EchoReference>) -> Result<(Playback, ConsoleOutput)> {
    let d = find_device(Direction::Output, name)?;
    let status = Arc::new(DeviceStatus::default());
    let (stream, producer, c) = open(&d, Direction::Output, |c| {
        let cfg: StreamConfig = c.config();
        let cap = (cfg.sample_rate.0 * PLAYBACK_RING_MS / 1000) as usize;
        let (producer, consumer) = rtrb::RingBuffer::<f32>::new(cap);
        let prefill = (cfg.sample_rate.0 * PLAYBACK_PREFILL_MS / 1000) as usize;
        let st = status.clone();
        let stream = with_sample_type!(
            c.sample_format(),
            T,
            build_output::<T>(&d, &cfg, consumer, prefill, st, reference.clone())
        )?;
        Ok((stream, producer))
    })?;
    let rate = c.sample_rate().0;
    let description = describe(&d, &c);
    Ok((
        Playback {
            _stream: stream,
            description: description.clone(),
        },
        ConsoleOutput {
            capacity: producer.buffer().capacity(),
            ring: producer,
            rate,
            resampler: None,
            scratch: Vec::with_capacity(rate as usize / 10),
            status,
            reference,
            high_water: (rate * PLAYBACK_HIGH_WATER_MS / 1000) as usize,
            dropped: 0,
            name: description,
        },
    ))
}

fn build_output<T>(
    d: &cpal::Device,
    cfg: &StreamConfig,
    mut ring: rtrb::Consumer<f32>,
    prefill: usize,
    status: Arc<DeviceStatus>,
    reference: Arc<EchoReference>,
) -> Result<cpal::Stream, String>
where
    T: SizedSample + FromSample<f32>,
{
    let channels = cfg.channels.max(1) as usize;
    let mut playing = false;
    d.build_output_stream(
        cfg,
        move |data: &mut [T], info: &cpal::OutputCallbackInfo| {
            let ts = info.timestamp();
            if let Some(lat) = ts.playback.duration_since(&ts.callback) {
                reference.set_output_latency(lat);
            }
            if !playing && ring.slots() >= prefill {
                playing = true;
            }
            for frame in data.chunks_mut(channels) {
                let s = if playing {
                    match ring.pop() {
                        Ok(s) => s,
                        Err(_) => {
                            // Ran dry: silence until the prefill is there again.
                            playing = false;
                            0.0
                        }
                    }
                } else {
                    0.0
                };
                let v = T::from_sample(s);
                for x in frame.iter_mut() {
                    *x = v;
                }
            }
        },
        move |e| status.fail(format!("{e}")),
        None,
    )
    .map_err(|e| e.to_string())
}

/// The call's side of the microphone ([`CallInput`]).
pub struct ConsoleInput {
    id: Option<uuid::Uuid>,
    ring: rtrb::Consumer<f32>,
    resampler: StreamResampler,
    scratch: Vec<i16>,
    pending: Vec<i16>,
    status: Arc<DeviceStatus>,
    hangup: Arc<AtomicBool>,
    hangup_key: char,
    hangup_sent: bool,
    last_audio: Instant,
    gate: EchoGate,
    reference: Arc<EchoReference>,
    gated_frames: Arc<AtomicU64>,
    frames: u64,
    name: String,
}

impl ConsoleInput {
    /// A counter of the 20 ms microphone frames with sound in them that the echo gate turned
    /// to silence.
    pub fn gated_frames(&self) -> Arc<AtomicU64> {
        self.gated_frames.clone()
    }

    /// The next whole 20 ms frame, if one is buffered.
    fn take_frame(&mut self) -> Option<Frame> {
        let n = CALL_RATE.samples_per_20ms();
        if self.pending.len() < n {
            return None;
        }
        self.frames += 1;
        let frame = &mut self.pending[..n];
        let reference = self.reference.loudest(Instant::now(), self.reference.window());
        let level = rms_dbfs(frame);
        if !self.gate.pass(level, reference) {
            if level > MUTED_COUNT_FLOOR_DBFS {
                self.gated_frames.fetch_add(1, Ordering::Relaxed);
            }
            frame.fill(0);
        }
        let mut payload = BytesMut::with_capacity(n * 2);
        for s in frame.iter() {
            payload.put_i16_le(*s);
        }
        self.pending.drain(..n);
        Some(Frame::Audio {
            rate: CALL_RATE,
            payload: payload.freeze(),
        })
    }
}

impl CallInput for ConsoleInput {
    async fn read_frame(&mut self) -> Result<Option<Frame>, ConnectionError> {
        if let Some(id) = self.id.take() {
            // The call starts now: drop what the microphone heard while the models loaded.
            while self.ring.pop().is_ok() {}
            self.last_audio = Instant::now();
            return Ok(Some(Frame::Id(id)));
        }
        loop {
            if !self.hangup_sent && self.hangup.load(Ordering::Relaxed) {
                self.hangup_sent = true;
                return Ok(Some(Frame::Dtmf(self.hangup_key)));
            }
            if let Some(f) = self.take_frame() {
                return Ok(Some(f));
            }
            if let Some(e) = self.status.error() {
                return Err(ConnectionError::Device(format!(
                    "the microphone {} failed (unplugged, or the sound server stopped?): {e}",
                    self.name
                )));
            }
            self.scratch.clear();
            while let Ok(s) = self.ring.pop() {
                self.scratch.push((s * 32768.0).clamp(-32768.0, 32767.0) as i16);
            }
            if self.scratch.is_empty() {
                if self.last_audio.elapsed() >= Duration::from_millis(INPUT_STALL_MS) {
                    return Err(ConnectionError::Device(format!(
                        "the microphone {} delivered no audio for {INPUT_STALL_MS} ms (unplugged?)",
                        self.name
                    )));
                }
                tokio::time::sleep(Duration::from_millis(POLL_MS)).await;
            } else {
                self.last_audio = Instant::now();
                self.resampler.push(&self.scratch, &mut self.pending);
            }
        }
    }
}

/// The call's side of the speaker ([`CallOutput`]).
pub struct ConsoleOutput {
    ring: rtrb::Producer<f32>,
    capacity: usize,
    /// The device's rate (Hz).
    rate: u32,
    resampler: Option<(AudioRate, StreamResampler)>,
    scratch: Vec<i16>,
    status: Arc<DeviceStatus>,
    reference: Arc<EchoReference>,
    high_water: usize,
    dropped: u64,
    name: String,
}

impl ConsoleOutput {
    fn buffered(&self) -> usize {
        self.capacity - self.ring.slots()
    }

    fn check(&self) -> std::io::Result<()> {
        match self.status.error() {
            Some(e) => Err(std::io::Error::other(format!(
                "the speaker {} failed (unplugged, or the sound server stopped?): {e}",
                self.name
            ))),
            None => Ok(()),
        }
    }
}

impl CallOutput for ConsoleOutput {
    async fn write_samples(&mut self, rate: AudioRate, samples: &[i16]) -> std::io::Result<()> {
        self.check()?;
        let buffered = self.buffered();
        let level = rms_dbfs(samples);
        if level <= -120.0 && buffered > self.high_water {
            return Ok(()); // the sound card's clock is slower than the call's: skip silence
        }
        let due = Instant::now() + Duration::from_micros(buffered as u64 * 1_000_000 / self.rate as u64);
        self.reference.push(due, level);
        if self.resampler.as_ref().is_none_or(|(r, _)| *r != rate) {
            let r = StreamResampler::new(rate.hz(), self.rate, 20).map_err(std::io::Error::other)?;
            self.resampler = Some((rate, r));
        }
        let (_, resampler) = self.resampler.as_mut().expect("set above");
        self.scratch.clear();
        resampler.push(samples, &mut self.scratch);
        for &s in &self.scratch {
            if self.ring.push(s as f32 / 32768.0).is_err() {
                self.dropped += 1;
            }
        }
        Ok(())
    }

    async fn hangup(&mut self) -> std::io::Result<()> {
        // Let the last words (the goodbye) play out, for at most the ring's length.
        let deadline = Instant::now() + Duration::from_millis(PLAYBACK_RING_MS as u64 + 500);
        while self.buffered() > 0 && Instant::now() < deadline {
            self.check()?;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.dropped > 0 {
            tracing::warn!(
                samples = self.dropped,
                "playback buffer overflowed: agent audio dropped"
            );
        }
        Ok(())
    }

    async fn close(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
