//! Codec cost per record: encoding a publish batch as a producer does,
//! decoding it as the router does, and encoding deliveries from log entries.

#![allow(missing_docs)]

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use switchyard::protocol::{PublishBatchWriter, Record, decode, put_deliver_header, put_delivered};

const RECORDS: usize = 1000;

fn records() -> Vec<Record> {
    (0..RECORDS)
        .map(|i| Record::new(vec![b'x'; 100]).with_key(format!("key-{}", i % 64)))
        .collect()
}

fn encode_batch(recs: &[Record], buf: &mut BytesMut) {
    let mut w = PublishBatchWriter::begin(buf, 1, "bench");
    for r in recs {
        w.push(buf, r);
    }
    w.finish(buf);
}

fn codec(c: &mut Criterion) {
    let recs = records();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(RECORDS as u64));

    g.bench_function("encode_publish_batch_1000x100B", |b| {
        let mut buf = BytesMut::with_capacity(256 << 10);
        b.iter(|| {
            buf.clear();
            encode_batch(&recs, &mut buf);
            std::hint::black_box(buf.len())
        })
    });

    let mut frame = BytesMut::new();
    encode_batch(&recs, &mut frame);
    let frame = frame.freeze();
    g.bench_function("decode_publish_batch_1000x100B", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&frame[..]);
            std::hint::black_box(decode(&mut buf, 16 << 20).unwrap().unwrap())
        })
    });

    let raws: Vec<_> = recs.iter().map(|r| r.to_raw()).collect();
    g.bench_function("encode_deliver_1000x100B", |b| {
        let mut buf = BytesMut::with_capacity(256 << 10);
        b.iter(|| {
            buf.clear();
            let header_at = buf.len();
            buf.resize(13, 0);
            for (i, r) in raws.iter().enumerate() {
                put_delivered(&mut buf, i as u64, 1_700_000_000_000, r.as_bytes());
            }
            let body = buf.len() - 13;
            let mut h = [0u8; 13];
            put_deliver_header(&mut &mut h[..], 0, RECORDS as u32, body);
            buf[header_at..header_at + 13].copy_from_slice(&h);
            std::hint::black_box(buf.len())
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
