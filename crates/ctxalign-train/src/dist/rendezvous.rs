//! How the processes of a run meet before NCCL can connect them: rank 0 listens on a TCP port,
//! every other rank connects (retrying until rank 0 is up), and once all have arrived rank 0 sends
//! each the same payload — NCCL's 128-byte unique id. Both sides wait at most a timeout, naming the
//! ranks that did not come.
//!
//! Wire format (little-endian): a rank sends `b"CTXRDZV1"`, its rank and the world size as `u32`;
//! rank 0 answers `b"CTXRDZV1"`, a status byte (0: the payload follows, 1: a refusal message
//! follows), a `u32` length and the bytes.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::DistError;

const MAGIC: &[u8; 8] = b"CTXRDZV1";

fn err(address: &str, message: impl Into<String>) -> DistError {
    DistError::Rendezvous { address: address.to_string(), message: message.into() }
}

/// Rank 0's side: listens on `port` (all interfaces) until the other `world_size - 1` ranks have
/// connected, then sends them `payload`.
pub fn serve(port: u16, world_size: usize, payload: &[u8], timeout: Duration) -> Result<(), DistError> {
    let address = format!("0.0.0.0:{port}");
    let listener = TcpListener::bind(&address)
        .map_err(|e| err(&address, format!("rank 0 cannot listen: {e} (another run on this port? set MASTER_PORT)")))?;
    listener.set_nonblocking(true).map_err(|e| err(&address, e.to_string()))?;
    let deadline = Instant::now() + timeout;
    let mut peers: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
    let mut arrived = 1; // rank 0 itself
    while arrived < world_size {
        match listener.accept() {
            Ok((mut stream, from)) => {
                stream.set_nonblocking(false).map_err(|e| err(&address, e.to_string()))?;
                stream.set_read_timeout(Some(remaining(deadline))).map_err(|e| err(&address, e.to_string()))?;
                let mut hello = [0u8; 16];
                if stream.read_exact(&mut hello).is_err() || &hello[..8] != MAGIC {
                    continue; // not one of ours (a port scanner, another program): ignore it
                }
                let rank = u32::from_le_bytes(hello[8..12].try_into().expect("4 bytes")) as usize;
                let their_world = u32::from_le_bytes(hello[12..16].try_into().expect("4 bytes")) as usize;
                let refusal = if their_world != world_size {
                    Some(format!("rank {rank} at {from} has WORLD_SIZE={their_world}, rank 0 has {world_size}"))
                } else if rank == 0 || rank >= world_size {
                    Some(format!("a process at {from} says it is rank {rank} of {world_size}"))
                } else if peers[rank].is_some() {
                    Some(format!("two processes say they are rank {rank} (the second from {from})"))
                } else {
                    None
                };
                if let Some(message) = refusal {
                    let _ = reply(&mut stream, 1, message.as_bytes());
                    for peer in peers.iter_mut().flatten() {
                        let _ = reply(peer, 1, message.as_bytes());
                    }
                    return Err(err(&address, message));
                }
                peers[rank] = Some(stream);
                arrived += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (1..world_size).filter(|&r| peers[r].is_none()).collect();
                    let message = format!(
                        "rank(s) {missing:?} did not arrive within {:.0} s (not started, or cannot reach this \
                         machine at MASTER_ADDR:MASTER_PORT)",
                        timeout.as_secs_f64()
                    );
                    for peer in peers.iter_mut().flatten() {
                        let _ = reply(peer, 1, message.as_bytes());
                    }
                    return Err(err(&address, message));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(err(&address, e.to_string())),
        }
    }
    for (rank, peer) in peers.iter_mut().enumerate().skip(1) {
        let stream = peer.as_mut().expect("every rank arrived");
        reply(stream, 0, payload).map_err(|e| err(&address, format!("sending to rank {rank}: {e}")))?;
    }
    Ok(())
}

fn reply(stream: &mut TcpStream, status: u8, bytes: &[u8]) -> std::io::Result<()> {
    let mut message = MAGIC.to_vec();
    message.push(status);
    message.extend((bytes.len() as u32).to_le_bytes());
    message.extend(bytes);
    stream.write_all(&message)?;
    stream.flush()
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(1))
}

/// Any other rank's side: connects to rank 0 at `host:port` (retrying until it listens) and
/// returns its payload.
pub fn join(host: &str, port: u16, rank: usize, world_size: usize, timeout: Duration) -> Result<Vec<u8>, DistError> {
    let address = format!("{host}:{port}");
    let deadline = Instant::now() + timeout;
    let mut last_error = String::from("no address");
    let mut stream = loop {
        let targets: Vec<SocketAddr> = match (host, port).to_socket_addrs() {
            Ok(a) => a.collect(),
            Err(e) => {
                last_error = format!("cannot resolve MASTER_ADDR: {e}");
                vec![]
            }
        };
        let connected = targets.iter().find_map(|t| match TcpStream::connect_timeout(t, Duration::from_secs(2)) {
            Ok(s) => Some(s),
            Err(e) => {
                last_error = e.to_string();
                None
            }
        });
        if let Some(s) = connected {
            break s;
        }
        if Instant::now() >= deadline {
            return Err(err(
                &address,
                format!("rank {rank} could not reach rank 0 within {:.0} s: {last_error}", timeout.as_secs_f64()),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let io = |e: std::io::Error| err(&address, format!("rank {rank}: {e}"));
    let mut hello = MAGIC.to_vec();
    hello.extend((rank as u32).to_le_bytes());
    hello.extend((world_size as u32).to_le_bytes());
    stream.write_all(&hello).map_err(io)?;
    stream.set_read_timeout(Some(remaining(deadline))).map_err(io)?;
    let mut head = [0u8; 13];
    stream.read_exact(&mut head).map_err(|e| {
        err(&address, format!("rank {rank}: rank 0 did not answer within the timeout ({e}); are all ranks started?"))
    })?;
    if &head[..8] != MAGIC {
        return Err(err(&address, "the process at this address is not a ctxalign rank 0"));
    }
    let len = u32::from_le_bytes(head[9..13].try_into().expect("4 bytes")) as usize;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).map_err(io)?;
    match head[8] {
        0 => Ok(body),
        _ => Err(err(&address, format!("rank 0 refused: {}", String::from_utf8_lossy(&body)))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn every_rank_receives_rank_zeros_payload() {
        let port = free_port();
        let world = 4;
        let payload: Vec<u8> = (0..128u8).collect();
        std::thread::scope(|s| {
            let joins: Vec<_> = (1..world)
                .map(|rank| s.spawn(move || join("127.0.0.1", port, rank, world, Duration::from_secs(20))))
                .collect();
            // Rank 0 starts last: the others retry until it listens.
            std::thread::sleep(Duration::from_millis(300));
            serve(port, world, &payload, Duration::from_secs(20)).unwrap();
            for j in joins {
                assert_eq!(j.join().unwrap().unwrap(), payload);
            }
        });
    }

    #[test]
    fn missing_and_mismatched_ranks_are_named() {
        let port = free_port();
        let err = std::thread::scope(|s| {
            let one = s.spawn(move || join("127.0.0.1", port, 1, 3, Duration::from_secs(20)));
            let served = serve(port, 3, b"id", Duration::from_millis(800)).unwrap_err().to_string();
            let joined = one.join().unwrap().unwrap_err().to_string();
            assert!(joined.contains("rank 0 refused") && joined.contains("[2]"), "{joined}");
            served
        });
        assert!(err.contains("rank(s) [2] did not arrive"), "{err}");
        let port = free_port();
        let err = std::thread::scope(|s| {
            s.spawn(move || join("127.0.0.1", port, 1, 3, Duration::from_secs(20)));
            serve(port, 2, b"id", Duration::from_secs(20)).unwrap_err().to_string()
        });
        assert!(err.contains("WORLD_SIZE=3, rank 0 has 2"), "{err}");
        // Nobody listens: the rank gives up at its timeout.
        let err = join("127.0.0.1", free_port(), 1, 2, Duration::from_millis(500)).unwrap_err().to_string();
        assert!(err.contains("could not reach rank 0"), "{err}");
    }
}
