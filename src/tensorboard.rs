//! A TensorBoard event-file writer: scalars, PNG images and the session-restart marker.
//!
//! No maintained Rust crate writes event files without pulling in a protobuf toolchain, and the
//! format is small: TFRecord framing (`tensorflow/core/lib/io/record_writer.cc`) around
//! hand-encoded `Event` protobufs (`tensorboard/compat/proto/event.proto`,
//! `summary.proto`). Every record is `u64 len | masked crc32c(len) | data | masked crc32c(data)`;
//! one bad CRC makes TensorBoard drop the rest of the file, so the framing has known-vector tests.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// TFRecord's CRC mask: rotate right by 15 and add a constant.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// One TFRecord: length, its masked CRC, the payload, the payload's masked CRC.
pub fn frame_record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// Minimal protobuf encoding: just the wire types event files use.
mod pb {
    pub fn varint(out: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
        varint(out, ((field as u64) << 3) | wire as u64);
    }
    pub fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
        key(out, field, 0);
        varint(out, v);
    }
    pub fn double(out: &mut Vec<u8>, field: u32, v: f64) {
        key(out, field, 1);
        out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn float(out: &mut Vec<u8>, field: u32, v: f32) {
        key(out, field, 5);
        out.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes(out: &mut Vec<u8>, field: u32, v: &[u8]) {
        key(out, field, 2);
        varint(out, v.len() as u64);
        out.extend_from_slice(v);
    }
}

/// What an `Event` carries besides wall time and step.
enum Payload<'a> {
    FileVersion,
    /// `SessionLog{status: START}`: TensorBoard discards earlier events with step >= this one,
    /// so a resumed run's curves do not show the steps that were redone after a crash.
    SessionStart,
    Scalar(&'a str, f32),
    Image {
        tag: &'a str,
        png: &'a [u8],
        height: u32,
        width: u32,
    },
}

fn encode_event(wall_time: f64, step: u64, payload: Payload<'_>) -> Vec<u8> {
    let mut ev = Vec::new();
    pb::double(&mut ev, 1, wall_time);
    pb::uint(&mut ev, 2, step);
    match payload {
        Payload::FileVersion => pb::bytes(&mut ev, 3, b"brain.Event:2"),
        Payload::SessionStart => {
            let mut log = Vec::new();
            pb::uint(&mut log, 1, 1); // status = START
            pb::bytes(&mut ev, 7, &log); // Event.session_log (6 is the deprecated log_message)
        }
        Payload::Scalar(tag, v) => {
            let mut value = Vec::new();
            pb::bytes(&mut value, 1, tag.as_bytes());
            pb::float(&mut value, 2, v);
            let mut summary = Vec::new();
            pb::bytes(&mut summary, 1, &value);
            pb::bytes(&mut ev, 5, &summary);
        }
        Payload::Image {
            tag,
            png,
            height,
            width,
        } => {
            let mut image = Vec::new();
            pb::uint(&mut image, 1, height as u64);
            pb::uint(&mut image, 2, width as u64);
            pb::uint(&mut image, 3, 3); // colorspace RGB
            pb::bytes(&mut image, 4, png);
            let mut value = Vec::new();
            pb::bytes(&mut value, 1, tag.as_bytes());
            pb::bytes(&mut value, 4, &image);
            let mut summary = Vec::new();
            pb::bytes(&mut summary, 1, &value);
            pb::bytes(&mut ev, 5, &summary);
        }
    }
    ev
}

#[derive(Debug, thiserror::Error)]
#[error("cannot write TensorBoard events to {path}")]
pub struct EventError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// Appends events to one `events.out.tfevents.<secs>.<host>.<pid>` file.
pub struct EventWriter {
    file: File,
    path: PathBuf,
}

fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// Creates a new event file in `dir`. A resumed session passes the step it resumes from:
    /// TensorBoard then drops the earlier session's events after that step (the ones this
    /// session redoes), as PyTorch's `SummaryWriter(purge_step=...)` does.
    pub fn create(dir: &Path, resumed_from: u64) -> Result<Self, EventError> {
        let err = |source| EventError {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let host = std::fs::read_to_string("/etc/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let wall = now();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            wall as u64,
            std::process::id()
        ));
        let file = File::create(&path).map_err(err)?;
        let mut writer = Self { file, path };
        writer.write(encode_event(wall, 0, Payload::FileVersion))?;
        if resumed_from > 0 {
            // Purges events with step >= this one.
            writer.write(encode_event(wall, resumed_from + 1, Payload::SessionStart))?;
        }
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: Vec<u8>) -> Result<(), EventError> {
        // One write per record, flushed: a kill leaves at most one truncated record at the end,
        // which TensorBoard's reader stops at without losing the earlier ones.
        self.file
            .write_all(&frame_record(&event))
            .and_then(|()| self.file.flush())
            .map_err(|source| EventError {
                path: self.path.clone(),
                source,
            })
    }

    pub fn scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<(), EventError> {
        self.write(encode_event(
            now(),
            step,
            Payload::Scalar(tag, value as f32),
        ))
    }

    /// `png` must be an RGB PNG of `width` x `height`.
    pub fn image(
        &mut self,
        tag: &str,
        png: &[u8],
        height: u32,
        width: u32,
        step: u64,
    ) -> Result<(), EventError> {
        self.write(encode_event(
            now(),
            step,
            Payload::Image {
                tag,
                png,
                height,
                width,
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_known_vectors() {
        // RFC 3720 B.4 and the standard check value.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(crc32c::crc32c(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(crc32c::crc32c(&[0xffu8; 32]), 0x62a8_ab43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(crc32c::crc32c(&ascending), 0x46dd_794e);
        // The mask: ((crc >> 15) | (crc << 17)) + 0xa282ead8 mod 2^32.
        let crc = 0xe306_9283u32;
        let masked = crc.rotate_right(15).wrapping_add(0xa282_ead8);
        assert_eq!(masked_crc32c(b"123456789"), masked);
    }

    #[test]
    fn record_framing_matches_tfrecord() {
        let rec = frame_record(b"hello");
        assert_eq!(&rec[..8], &5u64.to_le_bytes());
        assert_eq!(
            &rec[8..12],
            &masked_crc32c(&5u64.to_le_bytes()).to_le_bytes()
        );
        assert_eq!(&rec[12..17], b"hello");
        assert_eq!(&rec[17..], &masked_crc32c(b"hello").to_le_bytes());
    }

    #[test]
    fn scalar_event_bytes() {
        // Event{wall_time: 1.5, step: 300, summary{value{tag:"a", simple_value: 2.0}}}
        let ev = encode_event(1.5, 300, Payload::Scalar("a", 2.0));
        let mut want = vec![0x09];
        want.extend_from_slice(&1.5f64.to_le_bytes());
        want.extend_from_slice(&[0x10, 0xac, 0x02]); // step 300 as a varint
        want.extend_from_slice(&[0x2a, 0x0a, 0x0a, 0x08, 0x0a, 0x01, b'a', 0x15]);
        want.extend_from_slice(&2.0f32.to_le_bytes());
        assert_eq!(ev, want);
        // Event{wall_time: 1.5, step: 3, session_log{status: START}}: field 7, not 6.
        let ev = encode_event(1.5, 3, Payload::SessionStart);
        assert_eq!(&ev[9..], &[0x10, 0x03, 0x3a, 0x02, 0x08, 0x01]);
    }
}
