//! Data-parallel training's collective operations: the ranks of a run (one process per GPU, on
//! one host or several) meet at a rendezvous address and sum their gradients there.
//!
//! `TcpGroup` is the transport every run has: rank 0 listens on the address, the others
//! connect to it and say their rank; a reduction sends every rank's vector to rank 0, which
//! adds them in rank order (0, 1, 2, …) and sends the sum back, so the result is the same bits
//! on every rank and in every run with the same inputs (no arrival-order dependence). Every
//! socket has a timeout, and a rank that exits closes its connection, so the others fail with
//! a message naming the rank instead of hanging. The same group carries what an NCCL
//! communicator would need (its unique id, `broadcast`), should a device transport be added.

use crate::{Error, Result};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Sums and broadcasts across the ranks of a data-parallel run.
pub trait Collective {
    /// This process's rank, `0..world()`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world(&self) -> usize;
    /// Replaces `v` on every rank by the elementwise sum over the ranks, added in rank order.
    fn all_reduce_sum(&mut self, v: &mut [f32]) -> Result<()>;
    /// The same for f64 values (losses, token counts).
    fn all_reduce_sum_f64(&mut self, v: &mut [f64]) -> Result<()>;
    /// Gives every rank rank 0's `bytes`.
    fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()>;
}

/// How long a rank waits for the others (to connect, or to answer a reduction) by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// The ranks' TCP star around rank 0 (see the module's documentation).
pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Rank 0: the connection of rank r at index r − 1. Other ranks: their one connection.
    peers: Vec<TcpStream>,
    addr: String,
}

/// The first bytes a rank sends: it is a qlora rank (then its rank and the world size).
const HELLO: &[u8; 8] = b"qlora-dp";

fn dist_err(addr: &str, what: String) -> Error {
    Error::Backend(format!("data-parallel group at {addr}: {what}"))
}

impl TcpGroup {
    /// Joins the group of `world` ranks meeting at `addr` (host:port) as `rank`: rank 0 binds
    /// and waits for the others; the others retry connecting until `timeout`.
    pub fn join(addr: &str, rank: usize, world: usize, timeout: Duration) -> Result<TcpGroup> {
        if world == 0 || rank >= world {
            return Err(Error::Invalid(format!(
                "rank {rank} of a data-parallel group of {world}: the rank must be below the world size"
            )));
        }
        let deadline = Instant::now() + timeout;
        let mut peers = Vec::new();
        if world == 1 {
            return Ok(TcpGroup {
                rank,
                world,
                peers,
                addr: addr.into(),
            });
        }
        if rank == 0 {
            let listener = TcpListener::bind(addr)
                .map_err(|e| dist_err(addr, format!("rank 0 cannot listen there: {e}")))?;
            listener
                .set_nonblocking(true)
                .map_err(|e| dist_err(addr, e.to_string()))?;
            let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            while slots.iter().any(|s| s.is_none()) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        s.set_nonblocking(false)
                            .map_err(|e| dist_err(addr, e.to_string()))?;
                        // A greeting within a few seconds; a connection that is not a qlora
                        // rank (a port scan, a health check) is dropped, not fatal.
                        configure(&s, Duration::from_secs(5).min(timeout), addr)?;
                        let mut hello = [0u8; 24];
                        if s.read_exact(&mut hello).is_err() || &hello[..8] != HELLO {
                            continue;
                        }
                        configure(&s, timeout, addr)?;
                        let r = u64::from_le_bytes(hello[8..16].try_into().expect("8 bytes"));
                        let w = u64::from_le_bytes(hello[16..24].try_into().expect("8 bytes"));
                        if w as usize != world || r == 0 || r as usize >= world {
                            return Err(dist_err(
                                addr,
                                format!(
                                    "a rank said it is {r} of {w}; this group has {world} ranks"
                                ),
                            ));
                        }
                        let slot = &mut slots[r as usize - 1];
                        if slot.is_some() {
                            return Err(dist_err(addr, format!("rank {r} joined twice")));
                        }
                        *slot = Some(s);
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        if Instant::now() > deadline {
                            let missing: Vec<String> = slots
                                .iter()
                                .enumerate()
                                .filter(|(_, s)| s.is_none())
                                .map(|(i, _)| (i + 1).to_string())
                                .collect();
                            return Err(dist_err(
                                addr,
                                format!(
                                    "rank(s) {} did not join within {} s",
                                    missing.join(", "),
                                    timeout.as_secs()
                                ),
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => return Err(dist_err(addr, e.to_string())),
                }
            }
            peers = slots.into_iter().map(|s| s.expect("filled")).collect();
        } else {
            let target = addr
                .to_socket_addrs()
                .map_err(|e| dist_err(addr, format!("not an address: {e}")))?
                .next()
                .ok_or_else(|| dist_err(addr, "resolves to nothing".into()))?;
            let mut s = loop {
                match TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                    Ok(s) => break s,
                    Err(e) => {
                        if Instant::now() > deadline {
                            return Err(dist_err(
                                addr,
                                format!(
                                    "rank {rank} could not reach rank 0 within {} s: {e}",
                                    timeout.as_secs()
                                ),
                            ));
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
            };
            configure(&s, timeout, addr)?;
            let mut hello = Vec::with_capacity(24);
            hello.extend_from_slice(HELLO);
            hello.extend_from_slice(&(rank as u64).to_le_bytes());
            hello.extend_from_slice(&(world as u64).to_le_bytes());
            s.write_all(&hello)
                .map_err(|e| dist_err(addr, format!("greeting rank 0: {e}")))?;
            peers.push(s);
        }
        Ok(TcpGroup {
            rank,
            world,
            peers,
            addr: addr.into(),
        })
    }

    fn send(&mut self, peer: usize, bytes: &[u8], who: usize) -> Result<()> {
        let s = &mut self.peers[peer];
        s.write_all(&(bytes.len() as u64).to_le_bytes())
            .and_then(|_| s.write_all(bytes))
            .map_err(|e| lost(&self.addr, who, e))
    }

    fn recv(&mut self, peer: usize, want: Option<usize>, who: usize) -> Result<Vec<u8>> {
        let s = &mut self.peers[peer];
        let mut len = [0u8; 8];
        s.read_exact(&mut len)
            .map_err(|e| lost(&self.addr, who, e))?;
        let n = u64::from_le_bytes(len) as usize;
        if want.is_some_and(|w| w != n) || n > (8usize << 30) {
            return Err(dist_err(
                &self.addr,
                format!(
                    "rank {who} sent {n} bytes where {} were due: the ranks are not running the same job",
                    want.map_or("fewer".into(), |w| w.to_string())
                ),
            ));
        }
        let mut buf = vec![0u8; n];
        s.read_exact(&mut buf)
            .map_err(|e| lost(&self.addr, who, e))?;
        Ok(buf)
    }

    /// Rank-ordered sum of byte-encoded vectors of `T` (f32 or f64).
    fn reduce<T: Copy + std::ops::AddAssign + bytemuck::Pod>(&mut self, v: &mut [T]) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        let bytes = std::mem::size_of_val(v);
        if self.rank == 0 {
            for r in 1..self.world {
                let got = self.recv(r - 1, Some(bytes), r)?;
                let theirs: &[T] = bytemuck::cast_slice(&got);
                v.iter_mut().zip(theirs).for_each(|(a, b)| *a += *b);
            }
            let out = bytemuck::cast_slice::<T, u8>(v).to_vec();
            for r in 1..self.world {
                self.send(r - 1, &out, r)?;
            }
        } else {
            self.send(0, bytemuck::cast_slice(v), 0)?;
            let got = self.recv(0, Some(bytes), 0)?;
            v.copy_from_slice(bytemuck::cast_slice(&got));
        }
        Ok(())
    }
}

fn configure(s: &TcpStream, timeout: Duration, addr: &str) -> Result<()> {
    s.set_nodelay(true)
        .and_then(|_| s.set_read_timeout(Some(timeout)))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(|e| dist_err(addr, e.to_string()))
}

fn lost(addr: &str, who: usize, e: std::io::Error) -> Error {
    let what = match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            "did not answer within the timeout".to_string()
        }
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => "stopped (its connection closed)".to_string(),
        _ => e.to_string(),
    };
    dist_err(
        addr,
        format!("rank {who} {what}; this rank stops too (see that rank's own error)"),
    )
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce_sum(&mut self, v: &mut [f32]) -> Result<()> {
        self.reduce(v)
    }
    fn all_reduce_sum_f64(&mut self, v: &mut [f64]) -> Result<()> {
        self.reduce(v)
    }
    fn broadcast(&mut self, bytes: &mut Vec<u8>) -> Result<()> {
        if self.world == 1 {
            return Ok(());
        }
        if self.rank == 0 {
            let out = bytes.clone();
            for r in 1..self.world {
                self.send(r - 1, &out, r)?;
            }
        } else {
            *bytes = self.recv(0, None, 0)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_addr() -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    }

    /// Rank 0 of two, in a thread, summing four ones once.
    fn root_of_two(addr: &str) -> std::thread::JoinHandle<Result<()>> {
        let a = addr.to_string();
        std::thread::spawn(move || {
            let mut g = TcpGroup::join(&a, 0, 2, Duration::from_secs(20)).unwrap();
            let mut v = vec![1.0f32; 4];
            g.all_reduce_sum(&mut v)
        })
    }

    #[test]
    fn sums_in_rank_order_on_every_rank_and_broadcasts() {
        let addr = free_addr();
        let world = 3;
        let handles: Vec<_> = (0..world)
            .map(|r| {
                let addr = addr.clone();
                std::thread::spawn(move || {
                    let mut g = TcpGroup::join(&addr, r, world, Duration::from_secs(20)).unwrap();
                    // Values whose sum depends on the order of the additions.
                    let mut v: Vec<f32> = (0..1000)
                        .map(|i| [1e8f32, 1.0, -1e8][r] * (1.0 + i as f32 * 1e-3))
                        .collect();
                    g.all_reduce_sum(&mut v).unwrap();
                    let mut s = vec![r as f64 + 0.5];
                    g.all_reduce_sum_f64(&mut s).unwrap();
                    let mut b = if r == 0 { b"id".to_vec() } else { Vec::new() };
                    g.broadcast(&mut b).unwrap();
                    (v, s, b)
                })
            })
            .collect();
        let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let want: Vec<f32> = (0..1000)
            .map(|i| {
                let f = 1.0 + i as f32 * 1e-3;
                let mut a = 1e8f32 * f;
                a += 1.0 * f;
                a += -1e8 * f;
                a
            })
            .collect();
        for (v, s, b) in &out {
            assert_eq!(
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                want.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
            assert_eq!(s[0], 0.5 + 1.5 + 2.5);
            assert_eq!(b, b"id");
        }
    }

    #[test]
    fn a_rank_that_dies_makes_the_others_fail_not_hang() {
        let addr = free_addr();
        let root = root_of_two(&addr);
        {
            // Rank 1 joins, then exits before its part of the reduction.
            let _g = TcpGroup::join(&addr, 1, 2, Duration::from_secs(20)).unwrap();
        }
        let e = root.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("rank 1 stopped"), "{e}");
    }

    #[test]
    fn a_rank_that_never_joins_is_named_after_the_timeout() {
        let addr = free_addr();
        let t0 = Instant::now();
        let e = TcpGroup::join(&addr, 0, 3, Duration::from_millis(300))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("rank(s) 1, 2 did not join"), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(10));
        let e = TcpGroup::join(&addr, 3, 3, Duration::from_secs(1))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("must be below"), "{e}");
    }

    #[test]
    fn a_stray_connection_does_not_stop_rank_0() {
        let addr = free_addr();
        let root = root_of_two(&addr);
        // Something else connects first and says nothing useful.
        std::thread::sleep(Duration::from_millis(100));
        {
            let mut s = TcpStream::connect(&addr).unwrap();
            let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n.....");
        }
        let mut g = TcpGroup::join(&addr, 1, 2, Duration::from_secs(20)).unwrap();
        let mut v = vec![2.0f32; 4];
        g.all_reduce_sum(&mut v).unwrap();
        assert_eq!(v, vec![3.0; 4]);
        root.join().unwrap().unwrap();
    }

    #[test]
    fn mismatched_jobs_are_refused() {
        let addr = free_addr();
        let root = root_of_two(&addr);
        let mut g = TcpGroup::join(&addr, 1, 2, Duration::from_secs(20)).unwrap();
        let mut v = vec![1.0f32; 5];
        let _ = g.all_reduce_sum(&mut v);
        let e = root.join().unwrap().unwrap_err().to_string();
        assert!(e.contains("not running the same job"), "{e}");
    }
}
