//! The machine's own floor under `switchyard bench`'s latency numbers, with
//! no broker involved:
//!
//! - a loopback UDP round trip between threads, sent open loop at a fixed
//!   rate (latency from each packet's intended send time, as `bench --rate`
//!   measures), which every publish -> deliver path pays at least once;
//! - one 4 KiB `pwrite` + `fdatasync` into a pre-written file, which every
//!   durable acknowledgement pays at least once.
//!
//! ```text
//! cargo run --release -p switchyard-benches --example floor -- [--rate 5000] [--secs 8] [--dir .]
//! ```

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::net::UdpSocket;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

struct Args {
    rate: u64,
    secs: u64,
    dir: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        rate: 5000,
        secs: 8,
        dir: PathBuf::from("."),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage(&flag));
        match flag.as_str() {
            "--rate" => a.rate = value.parse().unwrap_or_else(|_| usage(&flag)),
            "--secs" => a.secs = value.parse().unwrap_or_else(|_| usage(&flag)),
            "--dir" => a.dir = PathBuf::from(value),
            _ => usage(&flag),
        }
    }
    a
}

fn usage(flag: &str) -> ! {
    eprintln!("bad argument {flag}; usage: floor [--rate N] [--secs S] [--dir PATH]");
    std::process::exit(2)
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid bounds")
}

fn line(name: &str, h: &Histogram<u64>) {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1e3;
    println!(
        "  {name:<26} p50 {:>8.1} µs  p90 {:>8.1} µs  p99 {:>8.1} µs  p99.9 {:>8.1} µs  max {:>8.1} µs  ({} samples)",
        us(0.5),
        us(0.9),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1e3,
        h.len()
    );
}

/// Open-loop UDP echo over loopback: a pacing thread sends, an echo thread
/// answers, a third thread receives.
fn udp(rate: u64, secs: u64) -> std::io::Result<(Histogram<u64>, Histogram<u64>)> {
    let echo = UdpSocket::bind("127.0.0.1:0")?;
    let client = UdpSocket::bind("127.0.0.1:0")?;
    client.connect(echo.local_addr()?)?;
    client.set_read_timeout(Some(Duration::from_millis(500)))?;
    let t0 = Instant::now();
    let now_ns = move || t0.elapsed().as_nanos() as u64;
    let count = rate * secs;

    let echoer = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = echo.recv_from(&mut buf) {
            if n == 1 {
                break;
            }
            let _ = echo.send_to(&buf[..n], from);
        }
    });
    let rx = client.try_clone()?;
    let receiver = std::thread::spawn(move || {
        let mut h = hist();
        let mut buf = [0u8; 2048];
        while h.len() < count {
            match rx.recv(&mut buf) {
                Ok(n) if n >= 8 => {
                    let at = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                    let _ = h.record(now_ns().saturating_sub(at).max(1));
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        h
    });

    precise_sleeps();
    let mut lag = hist();
    let interval = 1e9 / rate as f64;
    let mut packet = [b'x'; 100];
    for k in 0..count {
        let at = (k as f64 * interval) as u64;
        let now = now_ns();
        if at > now {
            std::thread::sleep(Duration::from_nanos(at - now));
        }
        let _ = lag.record(now_ns().saturating_sub(at).max(1));
        packet[..8].copy_from_slice(&at.to_le_bytes());
        client.send(&packet)?;
    }
    let rtt = receiver.join().expect("receiver thread");
    client.send(&[0])?;
    echoer.join().expect("echo thread");
    Ok((rtt, lag))
}

/// One 4 KiB block written and synced at a time into a pre-written 8 MiB
/// file (as the journal does), closed loop.
fn sync(dir: &std::path::Path, count: u64) -> std::io::Result<Histogram<u64>> {
    const SIZE: u64 = 8 << 20;
    let path = dir.join(format!("floor-{}.tmp", std::process::id()));
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    let result = (|| {
        let zeros = vec![0u8; 1 << 20];
        for _ in 0..SIZE / zeros.len() as u64 {
            file.write_all(&zeros)?;
        }
        file.sync_all()?;
        let block = [b'y'; 4096];
        let mut h = hist();
        for i in 0..count {
            let t = Instant::now();
            file.seek(SeekFrom::Start((i * 4096) % SIZE))?;
            file.write_all(&block)?;
            file.sync_data()?;
            let _ = h.record(t.elapsed().as_nanos() as u64);
        }
        Ok(h)
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// As `switchyard bench`: ask Linux not to batch this thread's timer
/// wake-ups (by default it may delay them by up to 50 µs).
fn precise_sleeps() {
    #[cfg(target_os = "linux")]
    {
        let _ = nix::sys::prctl::set_timerslack(1);
    }
}

fn main() {
    let a = args();
    println!(
        "loopback UDP echo, open loop at {} msg/s for {} s, 100 B:",
        a.rate, a.secs
    );
    match udp(a.rate, a.secs) {
        Ok((rtt, lag)) => {
            line("send lag", &lag);
            line("round trip", &rtt);
        }
        Err(e) => eprintln!("udp: {e}"),
    }
    println!("4 KiB pwrite + fdatasync in {}:", a.dir.display());
    match sync(&a.dir, 5000) {
        Ok(h) => line("write + sync", &h),
        Err(e) => eprintln!("sync: {e}"),
    }
}
