//! The messages between the processes of a launch: a tag byte, then fixed-width little-endian
//! integers, length-prefixed strings and f32 arrays. Nothing here knows about ranks.

use std::io::{BufWriter, Read, Write};
use std::net::TcpStream;

/// The wire messages (little-endian, length-prefixed).
#[derive(Debug, Clone, PartialEq)]
pub enum Msg {
    /// A process introduces itself to rank 0: its rank, the world size, the crate version and
    /// its resolved config (compared as text so a mismatch names the keys).
    Hello {
        rank: u32,
        world: u32,
        version: String,
        config: String,
    },
    /// Rank 0 accepts: the NCCL unique id (empty on the CPU).
    Welcome { nccl_id: Vec<u8> },
    /// Rank 0 refuses the launch.
    Refuse { message: String },
    /// A rank's contribution to collective `what` (empty data: a barrier).
    Contribute { what: String, data: Vec<f32> },
    /// Rank 0's answer: the sum.
    Sum { data: Vec<f32> },
    /// What the sender is doing now (for the others' timeout messages).
    Doing { what: String },
    /// `rank` failed with `message`; everyone stops.
    Fail { rank: u32, message: String },
}

const HELLO: u8 = 1;
const WELCOME: u8 = 2;
const REFUSE: u8 = 3;
const CONTRIBUTE: u8 = 4;
const SUM: u8 = 5;
const DOING: u8 = 6;
const FAIL: u8 = 7;

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    out.extend((v.len() as u64).to_le_bytes());
    out.reserve(4 * v.len());
    for x in v {
        out.extend(x.to_le_bytes());
    }
}

pub fn encode(msg: &Msg) -> Vec<u8> {
    let mut b = Vec::new();
    match msg {
        Msg::Hello {
            rank,
            world,
            version,
            config,
        } => {
            b.push(HELLO);
            b.extend(rank.to_le_bytes());
            b.extend(world.to_le_bytes());
            put_str(&mut b, version);
            put_str(&mut b, config);
        }
        Msg::Welcome { nccl_id } => {
            b.push(WELCOME);
            b.extend((nccl_id.len() as u64).to_le_bytes());
            b.extend(nccl_id);
        }
        Msg::Refuse { message } => {
            b.push(REFUSE);
            put_str(&mut b, message);
        }
        Msg::Contribute { what, data } => {
            b.push(CONTRIBUTE);
            put_str(&mut b, what);
            put_f32s(&mut b, data);
        }
        Msg::Sum { data } => {
            b.push(SUM);
            put_f32s(&mut b, data);
        }
        Msg::Doing { what } => {
            b.push(DOING);
            put_str(&mut b, what);
        }
        Msg::Fail { rank, message } => {
            b.push(FAIL);
            b.extend(rank.to_le_bytes());
            put_str(&mut b, message);
        }
    }
    b
}

fn read_exact<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

fn read_len(r: &mut impl Read, unit: u64) -> std::io::Result<usize> {
    let n = u64::from_le_bytes(read_exact::<8>(r)?);
    // 8 GiB: more than any gradient buffer; a larger length is a corrupt or foreign stream.
    if n.saturating_mul(unit) > 8 << 30 {
        return Err(std::io::Error::other(format!(
            "a message announces {n} values: not a difftrain peer, or a corrupt stream"
        )));
    }
    Ok(n as usize)
}

fn read_bytes(r: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let n = read_len(r, 1)?;
    let mut v = vec![0u8; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

fn read_str(r: &mut impl Read) -> std::io::Result<String> {
    String::from_utf8(read_bytes(r)?).map_err(std::io::Error::other)
}

fn read_f32s(r: &mut impl Read) -> std::io::Result<Vec<f32>> {
    let n = read_len(r, 4)?;
    let mut bytes = vec![0u8; 4 * n];
    r.read_exact(&mut bytes)?;
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

pub fn decode(r: &mut impl Read) -> std::io::Result<Msg> {
    let tag = read_exact::<1>(r)?[0];
    Ok(match tag {
        HELLO => Msg::Hello {
            rank: u32::from_le_bytes(read_exact(r)?),
            world: u32::from_le_bytes(read_exact(r)?),
            version: read_str(r)?,
            config: read_str(r)?,
        },
        WELCOME => Msg::Welcome {
            nccl_id: read_bytes(r)?,
        },
        REFUSE => Msg::Refuse {
            message: read_str(r)?,
        },
        CONTRIBUTE => Msg::Contribute {
            what: read_str(r)?,
            data: read_f32s(r)?,
        },
        SUM => Msg::Sum {
            data: read_f32s(r)?,
        },
        DOING => Msg::Doing { what: read_str(r)? },
        FAIL => Msg::Fail {
            rank: u32::from_le_bytes(read_exact(r)?),
            message: read_str(r)?,
        },
        t => {
            return Err(std::io::Error::other(format!(
                "unknown message type {t}: not a difftrain peer of this version"
            )));
        }
    })
}

pub fn send(w: &mut BufWriter<TcpStream>, msg: &Msg) -> std::io::Result<()> {
    w.write_all(&encode(msg))?;
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let msgs = [
            Msg::Hello {
                rank: 2,
                world: 3,
                version: "0.1.0".into(),
                config: "[run]\nname = \"x\"\n".into(),
            },
            Msg::Welcome {
                nccl_id: vec![1; 128],
            },
            Msg::Refuse {
                message: "no".into(),
            },
            Msg::Contribute {
                what: "the all-reduce of step 3".into(),
                data: vec![1.5, -0.0, f32::NAN],
            },
            Msg::Sum { data: vec![] },
            Msg::Doing {
                what: "writing checkpoint-40".into(),
            },
            Msg::Fail {
                rank: 1,
                message: "boom".into(),
            },
        ];
        for m in msgs {
            let bytes = encode(&m);
            let back = decode(&mut &bytes[..]).unwrap();
            // NaN != NaN: compare the encodings.
            assert_eq!(encode(&back), bytes, "{m:?}");
        }
        assert!(decode(&mut &[99u8][..]).is_err());
    }
}
