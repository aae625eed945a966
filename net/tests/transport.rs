//! The TCP transport against real sockets on 127.0.0.1 (OS-chosen ports).
//!
//! Nothing here sleeps to synchronise: every wait is on a channel or a
//! socket, and `timeout(BOUND, ..)` only turns a hang into a failure. The
//! short configured timeouts (preamble, frame, idle) are what is under test.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use peerstore_core::wire::Addr;
use peerstore_net::{NetEvent, SendError, Transport, TransportConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc::Receiver;
use tokio::time::{timeout, Instant};

/// How long any single wait may take before the test fails.
const BOUND: Duration = Duration::from_secs(10);

fn localhost() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn node(cfg: TransportConfig) -> (Transport, Receiver<NetEvent>, Addr) {
    let (transport, events) = Transport::bind(localhost(), cfg).await.unwrap();
    let addr = transport.advertised().unwrap();
    assert_eq!(addr, Addr::from(transport.local_addr().unwrap()));
    (transport, events, addr)
}

fn tcp(addr: Addr) -> SocketAddr {
    match addr {
        Addr::Tcp(socket) => socket.socket(),
        Addr::Slot(_) => unreachable!(),
    }
}

async fn next_event(events: &mut Receiver<NetEvent>) -> NetEvent {
    timeout(BOUND, events.recv())
        .await
        .expect("no event in time")
        .expect("event channel closed")
}

/// The next packet, skipping close reports.
async fn next_packet(events: &mut Receiver<NetEvent>) -> (Addr, Vec<u8>) {
    loop {
        if let NetEvent::Packet { from, bytes } = next_event(events).await {
            return (from, bytes);
        }
    }
}

async fn next_closed(events: &mut Receiver<NetEvent>) -> Addr {
    loop {
        if let NetEvent::Closed { peer } = next_event(events).await {
            return peer;
        }
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut bytes = (body.len() as u32).to_be_bytes().to_vec();
    bytes.extend_from_slice(body);
    bytes
}

const CLIENT_PREAMBLE: &[u8] = b"PSNET1\x01";

/// A hand-driven client connection that has sent its preamble.
async fn raw_client(node: Addr) -> TcpStream {
    let mut stream = TcpStream::connect(tcp(node)).await.unwrap();
    stream.write_all(&frame(CLIENT_PREAMBLE)).await.unwrap();
    stream
}

/// Waits until the other end closes `stream` (end of file or reset).
async fn until_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    timeout(BOUND, async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await
    .expect("connection not closed in time");
}

/// One round trip between two nodes: `a` sends, `b` answers.
async fn ping_pong(
    a: &Transport,
    a_events: &mut Receiver<NetEvent>,
    b: &Transport,
    b_events: &mut Receiver<NetEvent>,
    n: u32,
) {
    let a_addr = a.advertised().unwrap();
    let b_addr = b.advertised().unwrap();
    a.send(b_addr, n.to_be_bytes().to_vec()).unwrap();
    assert_eq!(
        next_packet(b_events).await,
        (a_addr, n.to_be_bytes().to_vec())
    );
    b.send(a_addr, (n + 1).to_be_bytes().to_vec()).unwrap();
    assert_eq!(
        next_packet(a_events).await,
        (b_addr, (n + 1).to_be_bytes().to_vec())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_and_clients_exchange_packets() {
    let (a, mut a_events, a_addr) = node(TransportConfig::default()).await;
    let (b, mut b_events, b_addr) = node(TransportConfig::default()).await;

    // a opens a connection to b; b's reply rides back on it.
    ping_pong(&a, &mut a_events, &b, &mut b_events, 1).await;
    assert_eq!(a.stats().connected, 1);
    assert_eq!(b.stats().connected, 0, "b answered on a's connection");
    assert_eq!(b.stats().accepted, 1);

    // Order is kept, in both directions, large packets included. Bursts
    // stay within the send queue (64 packets), past which packets drop.
    for burst in 0..2u32 {
        let numbers = burst * 50..(burst + 1) * 50;
        for i in numbers.clone() {
            a.send(b_addr, i.to_be_bytes().repeat(1 + i as usize * 100))
                .unwrap();
        }
        for i in numbers {
            let (from, bytes) = next_packet(&mut b_events).await;
            assert_eq!(from, a_addr);
            assert_eq!(bytes, i.to_be_bytes().repeat(1 + i as usize * 100));
        }
    }
    let block = vec![0xAB; 1024 * 1024 + 1000];
    b.send(a_addr, block.clone()).unwrap();
    assert_eq!(next_packet(&mut a_events).await, (b_addr, block));

    // A client has no listener: it is known by its connection's address,
    // and the node's reply to that address reaches it.
    let (c, mut c_events) = Transport::connect_as_client(tcp(b_addr), TransportConfig::default())
        .await
        .unwrap();
    assert_eq!(c.local_addr(), None);
    c.send(b_addr, b"hello".to_vec()).unwrap();
    let (client, bytes) = next_packet(&mut b_events).await;
    assert_eq!(bytes, b"hello");
    assert!(client != a_addr && client != b_addr);
    b.send(client, b"welcome".to_vec()).unwrap();
    assert_eq!(
        next_packet(&mut c_events).await,
        (b_addr, b"welcome".to_vec())
    );
    assert_eq!(b.stats().connected, 0, "b never dialled anyone");

    // The client leaves: the node is told, and does not try to dial the
    // client's ephemeral port afterwards.
    drop(c);
    assert_eq!(next_closed(&mut b_events).await, client);
    assert_eq!(b.send(client, b"late".to_vec()), Err(SendError::NoRoute));

    // A node shutting down closes its connections; the peer is told.
    drop(b);
    assert_eq!(next_closed(&mut a_events).await, b_addr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_length_closes_only_that_connection() {
    let cfg = TransportConfig {
        max_frame_bytes: 4096,
        ..TransportConfig::default()
    };
    let (a, mut a_events, _) = node(cfg.clone()).await;
    let (b, mut b_events, b_addr) = node(cfg).await;
    ping_pong(&a, &mut a_events, &b, &mut b_events, 1).await;

    // Exactly the limit passes; one more byte is refused by the sender...
    a.send(b_addr, vec![1; 4096]).unwrap();
    assert_eq!(next_packet(&mut b_events).await.1, vec![1; 4096]);
    assert_eq!(
        a.send(b_addr, vec![1; 4097]),
        Err(SendError::TooLarge {
            len: 4097,
            max: 4096
        })
    );
    assert_eq!(a.stats().dropped, 1);

    // ... and cuts a peer that announces it.
    let mut attacker = raw_client(b_addr).await;
    attacker.write_all(&4097u32.to_be_bytes()).await.unwrap();
    until_closed(&mut attacker).await;
    assert_eq!(b.stats().oversized, 1);
    // Even the largest length is never allocated.
    let mut attacker = raw_client(b_addr).await;
    attacker.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    until_closed(&mut attacker).await;
    assert_eq!(b.stats().oversized, 2);

    ping_pong(&a, &mut a_events, &b, &mut b_events, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_preambles_are_refused() {
    let (b, _b_events, b_addr) = node(TransportConfig::default()).await;
    let garbage: [&[u8]; 5] = [
        &frame(b"HELLO!\x01"),
        &frame(b"PSNET1\x00not an address"),
        &frame(b"PSNET1\x000.0.0.0:4000"),
        // A node preamble's length prefix far over the preamble bound.
        &frame(&[b'x'; 100]),
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    ];
    for (i, bytes) in garbage.into_iter().enumerate() {
        let mut stream = TcpStream::connect(tcp(b_addr)).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        until_closed(&mut stream).await;
        assert_eq!(b.stats().preamble_rejected, i as u64 + 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_cut_after_the_preamble_timeout() {
    let preamble_timeout = Duration::from_millis(200);
    let (b, _b_events, b_addr) = node(TransportConfig {
        preamble_timeout,
        ..TransportConfig::default()
    })
    .await;
    let started = Instant::now();
    let mut silent = TcpStream::connect(tcp(b_addr)).await.unwrap();
    until_closed(&mut silent).await;
    assert!(started.elapsed() >= preamble_timeout);
    assert_eq!(b.stats().preamble_timeouts, 1);
}

// On one thread, as peerstore-node runs: nothing here may rely on a
// second thread to keep serving.
#[tokio::test(flavor = "current_thread")]
async fn a_thousand_idle_connections_do_not_slow_a_normal_peer() {
    const IDLE: usize = 1000;
    let cfg = TransportConfig {
        max_connections: IDLE + 10,
        incoming_queue_packets: 16,
        ..TransportConfig::default()
    };
    let (a, mut a_events, _) = node(TransportConfig::default()).await;
    let (b, mut b_events, b_addr) = node(cfg).await;

    // Each idle client says one thing, so the node has demonstrably
    // accepted it, then stays silent and keeps its socket open.
    let mut idle = Vec::with_capacity(IDLE);
    for i in 0..IDLE as u32 {
        let mut stream = raw_client(b_addr).await;
        stream.write_all(&frame(&i.to_be_bytes())).await.unwrap();
        idle.push(stream);
    }
    let mut senders = HashSet::new();
    let mut seen = HashSet::new();
    for _ in 0..IDLE {
        let (from, bytes) = next_packet(&mut b_events).await;
        senders.insert(from);
        seen.insert(u32::from_be_bytes(bytes.try_into().unwrap()));
    }
    assert_eq!(senders.len(), IDLE, "each client is its own address");
    assert_eq!(seen.len(), IDLE);
    assert_eq!(b.stats().connections_open, IDLE);

    for n in 0..20 {
        ping_pong(&a, &mut a_events, &b, &mut b_events, n * 2).await;
    }
    assert_eq!(b.stats().connections_open, IDLE + 1);
    assert_eq!(b.stats().refused, 0);
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_refused() {
    let (b, mut b_events, b_addr) = node(TransportConfig {
        max_connections: 3,
        ..TransportConfig::default()
    })
    .await;
    let mut held = Vec::new();
    for i in 0..3u8 {
        let mut stream = raw_client(b_addr).await;
        stream.write_all(&frame(&[i])).await.unwrap();
        assert_eq!(next_packet(&mut b_events).await.1, vec![i]);
        held.push(stream);
    }
    let mut extra = TcpStream::connect(tcp(b_addr)).await.unwrap();
    until_closed(&mut extra).await;
    assert_eq!(b.stats().refused, 1);
    assert_eq!(b.stats().connections_open, 3);
    // A node at its limit cannot dial either, and says so.
    assert_eq!(
        b.send(Addr::from(localhost()), vec![1]),
        Err(SendError::ConnectionLimit)
    );
    // The held connections are still served.
    for (i, stream) in held.iter_mut().enumerate() {
        stream.write_all(&frame(&[i as u8 + 10])).await.unwrap();
    }
    let mut got: Vec<u8> = Vec::new();
    for _ in 0..3 {
        got.extend(next_packet(&mut b_events).await.1);
    }
    got.sort();
    assert_eq!(got, vec![10, 11, 12]);
}

// On one thread, as peerstore-node runs: nothing here may rely on a
// second thread to keep serving.
#[tokio::test(flavor = "current_thread")]
async fn a_slowloris_peer_is_cut_while_others_are_served() {
    let frame_read_timeout = Duration::from_millis(300);
    let cfg = TransportConfig {
        frame_read_timeout,
        ..TransportConfig::default()
    };
    let (a, mut a_events, _) = node(cfg.clone()).await;
    let (b, mut b_events, b_addr) = node(cfg).await;

    // Announces 100 bytes and then sends one every 20 ms: it would take
    // two seconds, far past the frame timeout.
    let mut slow = raw_client(b_addr).await;
    let started = Instant::now();
    slow.write_all(&100u32.to_be_bytes()).await.unwrap();
    let slowloris = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut buf = [0u8; 16];
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if slow.write_all(&[0]).await.is_err() {
                        return;
                    }
                }
                read = slow.read(&mut buf) => {
                    if matches!(read, Ok(0) | Err(_)) {
                        return;
                    }
                }
            }
        }
    });

    for n in 0..10 {
        ping_pong(&a, &mut a_events, &b, &mut b_events, n * 2).await;
    }
    timeout(BOUND, slowloris)
        .await
        .expect("slowloris not cut in time")
        .unwrap();
    assert!(started.elapsed() >= frame_read_timeout);
    assert_eq!(b.stats().frame_timeouts, 1);
    ping_pong(&a, &mut a_events, &b, &mut b_events, 100).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_and_reported() {
    let cfg = TransportConfig {
        idle_timeout: Duration::from_millis(200),
        ..TransportConfig::default()
    };
    let (a, mut a_events, a_addr) = node(cfg.clone()).await;
    let (b, mut b_events, b_addr) = node(cfg).await;
    ping_pong(&a, &mut a_events, &b, &mut b_events, 1).await;
    assert_eq!(next_closed(&mut a_events).await, b_addr);
    assert_eq!(next_closed(&mut b_events).await, a_addr);
    assert!(a.stats().idle_timeouts + b.stats().idle_timeouts >= 1);
    // The next packet simply opens a new connection.
    ping_pong(&a, &mut a_events, &b, &mut b_events, 3).await;
    assert_eq!(a.stats().connected, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_peer_is_reported_closed() {
    let (a, mut a_events, _) = node(TransportConfig::default()).await;
    // A port that was just free: nothing listens there.
    let vacant = std::net::TcpListener::bind(localhost())
        .unwrap()
        .local_addr()
        .unwrap();
    a.send(Addr::from(vacant), b"anyone?".to_vec()).unwrap();
    assert_eq!(next_closed(&mut a_events).await, Addr::from(vacant));
    assert_eq!(a.stats().connect_failed, 1);
    assert_eq!(a.send(Addr::Slot(3), vec![1]), Err(SendError::NoRoute));
    assert!(
        Transport::connect_as_client(vacant, TransportConfig::default())
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_stops_reading_never_blocks_its_sends() {
    let small = TransportConfig {
        incoming_queue_packets: 2,
        send_queue_packets: 4,
        ..TransportConfig::default()
    };
    let (a, _a_events, _) = node(small.clone()).await;
    // b never takes its events until the end of the test.
    let (b, mut b_events, b_addr) = node(small).await;
    let (c, mut c_events, c_addr) = node(TransportConfig::default()).await;

    // a floods b: every send returns at once; what does not fit in a's
    // queue is dropped and counted, never waited for.
    let started = Instant::now();
    let mut queued = Vec::new();
    for i in 0..200u32 {
        let mut packet = vec![0; 256 * 1024];
        packet[..4].copy_from_slice(&i.to_be_bytes());
        match a.send(b_addr, packet) {
            Ok(()) => queued.push(i),
            Err(SendError::QueueFull) => {}
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(started.elapsed() < BOUND);
    assert!(!queued.is_empty());
    assert_eq!(a.stats().dropped, 200 - queued.len() as u64);

    // b, stalled as a receiver, still sends, and c still gets it.
    for i in 0..10u8 {
        b.send(c_addr, vec![i]).unwrap();
        assert_eq!(next_packet(&mut c_events).await, (b_addr, vec![i]));
    }
    drop(c);

    // When b reads again, everything a queued arrives, in order: the
    // stall pushed back through TCP instead of losing packets.
    let mut got = Vec::new();
    while got.len() < queued.len() {
        if let NetEvent::Packet { bytes, .. } = next_event(&mut b_events).await {
            got.push(u32::from_be_bytes(bytes[..4].try_into().unwrap()));
        }
    }
    assert_eq!(got, queued);
    assert_eq!(b.stats().frames_in, queued.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_from_the_same_host_replaces_the_old_connection() {
    let (a, mut a_events, a_addr) = node(TransportConfig::default()).await;
    let (b, mut b_events, b_addr) = node(TransportConfig::default()).await;
    ping_pong(&a, &mut a_events, &b, &mut b_events, 1).await;

    // A second connection declaring a's address, from a's host (as after
    // a restart b has not noticed yet): b reports the old one closed
    // before the newcomer's first packet, and lets the old one go.
    let mut newcomer = TcpStream::connect(tcp(b_addr)).await.unwrap();
    let preamble = [b"PSNET1\x00".as_slice(), tcp(a_addr).to_string().as_bytes()].concat();
    newcomer.write_all(&frame(&preamble)).await.unwrap();
    newcomer.write_all(&frame(b"it's me")).await.unwrap();
    assert_eq!(
        next_event(&mut b_events).await,
        NetEvent::Closed { peer: a_addr }
    );
    assert_eq!(
        next_packet(&mut b_events).await,
        (a_addr, b"it's me".to_vec())
    );
    assert_eq!(next_closed(&mut a_events).await, b_addr);

    // b's replies now go to the newcomer.
    b.send(a_addr, b"hi".to_vec()).unwrap();
    let mut reply = [0u8; 6];
    timeout(BOUND, newcomer.read_exact(&mut reply))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reply, *frame(b"hi"));

    // a itself reconnects and takes its address back in turn.
    ping_pong(&a, &mut a_events, &b, &mut b_events, 3).await;
    assert_eq!(a.stats().connected, 2);
    until_closed(&mut newcomer).await;
}
