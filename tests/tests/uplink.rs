//! The uplinks on real devices: AF_PACKET on a testbed veth, and a TAP whose
//! kernel side is moved into a private namespace. Each test answers the
//! peer kernel's ARP request by hand (proving RX and TX), then checks the
//! peer learned our MAC and sends us the datagram that waited for it.

use anyhow::{ensure, Context, Result};
use hoststack::uplink::{AfPacket, AfPacketOptions, Tap, TapOptions, Uplink, UplinkError};
use hoststack_tests::{unique_tag, wait_for, ChildGuard, Netns, Testbed};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// Every wait in these tests is bounded by this.
const T: Duration = Duration::from_secs(5);
const ETH_ARP: u16 = 0x0806;
const ETH_IP4: u16 = 0x0800;
/// IEEE local experimental ethertype: the peer kernel ignores it.
const ETH_TEST: u16 = 0x88b5;
const MARK: &[u8] = b"hoststack-uplink-test";

fn ethertype(f: &[u8]) -> u16 {
    if f.len() < 14 {
        return 0;
    }
    u16::from_be_bytes([f[12], f[13]])
}

/// If `f` is an ARP request for `target`, the requester's (MAC, IP).
fn arp_request_for(f: &[u8], target: Ipv4Addr) -> Option<([u8; 6], Ipv4Addr)> {
    if ethertype(f) != ETH_ARP || f.len() < 42 {
        return None;
    }
    let a = &f[14..];
    // htype Ethernet, ptype IPv4, hlen 6, plen 4, oper request.
    if a[..8] != [0, 1, 8, 0, 6, 4, 0, 1] || a[24..28] != target.octets() {
        return None;
    }
    let mac = a[8..14].try_into().ok()?;
    let ip = Ipv4Addr::new(a[14], a[15], a[16], a[17]);
    Some((mac, ip))
}

/// An ARP reply "`our_ip` is at `our_mac`" to `to`, padded to 60 bytes.
fn write_arp_reply(b: &mut [u8], our_mac: [u8; 6], our_ip: Ipv4Addr, to: ([u8; 6], Ipv4Addr)) {
    b.fill(0);
    b[..6].copy_from_slice(&to.0);
    b[6..12].copy_from_slice(&our_mac);
    b[12..14].copy_from_slice(&ETH_ARP.to_be_bytes());
    b[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 2]);
    b[22..28].copy_from_slice(&our_mac);
    b[28..32].copy_from_slice(&our_ip.octets());
    b[32..38].copy_from_slice(&to.0);
    b[38..42].copy_from_slice(&to.1.octets());
}

/// Is `f` an IPv4/UDP datagram to `dst` (at `dst_mac`) carrying [`MARK`]?
fn is_marked_udp(f: &[u8], dst_mac: [u8; 6], dst: Ipv4Addr) -> bool {
    if ethertype(f) != ETH_IP4 || f.len() < 14 + 20 + 8 || f[..6] != dst_mac {
        return false;
    }
    let ip = &f[14..];
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    ip[9] == 17
        && ip[16..20] == dst.octets()
        && ip.len() >= ihl + 8
        && ip[ihl + 8..].starts_with(MARK)
}

fn mac_str(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Receive until `pred` accepts a frame (true) or `timeout` passes (false).
fn recv_until(
    up: &mut dyn Uplink,
    timeout: Duration,
    mut pred: impl FnMut(&[u8]) -> bool,
) -> Result<bool> {
    let t0 = Instant::now();
    let mut hit = false;
    while t0.elapsed() < timeout {
        let n = up.recv_batch(64, &mut |f, _| hit |= pred(f))?;
        if hit {
            return Ok(true);
        }
        if n == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(false)
}

/// `python3 -c` in `ns`: send `count` UDP datagrams of [`MARK`] to `dst`.
fn send_udp(ns: &Netns, dst: Ipv4Addr, count: u32) -> Result<ChildGuard> {
    let mark = std::str::from_utf8(MARK)?;
    let py = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
         for i in range({count}):\n    s.sendto(b'{mark}', ('{dst}', 9999))\n"
    );
    ChildGuard::spawn(&mut ns.cmd("python3", &["-c", &py]), "python3 udp sender")
}

/// The ARP exchange: the peer kernel (in `ns`, on `peer_if`) wants to send a
/// datagram to `our_ip` and asks for our MAC; we answer through `up`.
/// Returns the peer kernel's MAC.
fn arp_exchange(
    up: &mut dyn Uplink,
    ns: &Netns,
    peer_if: &str,
    our_ip: Ipv4Addr,
) -> Result<[u8; 6]> {
    let our_mac = up.mac();
    let mut sender = send_udp(ns, our_ip, 1)?;
    let mut requester = None;
    let got = recv_until(up, T, |f| {
        requester = arp_request_for(f, our_ip);
        requester.is_some()
    })?;
    ensure!(got, "no ARP request for {our_ip} within {T:?}");
    let requester = requester.context("requester")?;

    let before = up.stats();
    write_arp_reply(up.tx_frame(60), our_mac, our_ip, requester);
    up.flush()?;
    let after = up.stats();
    ensure!(
        after.tx_frames == before.tx_frames + 1 && after.tx_bytes == before.tx_bytes + 60,
        "ARP reply not counted as sent: {before:?} -> {after:?}"
    );

    // The peer kernel learned our MAC...
    let want = mac_str(our_mac);
    wait_for("the peer's neighbour entry", T, || {
        let out = ns.ip(&["neigh", "show", &our_ip.to_string(), "dev", peer_if])?;
        Ok(out.contains(&want) && !out.contains("FAILED") && !out.contains("INCOMPLETE"))
    })?;
    // ...and sends us the datagram that waited for it.
    ensure!(
        recv_until(up, T, |f| is_marked_udp(f, our_mac, our_ip))?,
        "the peer's datagram to {our_ip} did not arrive after the ARP reply"
    );
    sender.success(T)?;
    Ok(requester.0)
}

#[test]
fn af_packet_answers_arp_and_receives_udp() -> Result<()> {
    arp_and_udp(false)
}

#[test]
fn af_packet_rx_ring_answers_arp_and_receives_udp() -> Result<()> {
    arp_and_udp(true)
}

/// The daemon end of the testbed's veth, receiving through a small ring or
/// with recvmmsg.
fn open_af_packet(tb: &Testbed, rx_ring: bool) -> Result<AfPacket> {
    Ok(AfPacket::open(
        &tb.daemon_if,
        &AfPacketOptions {
            rx_ring_mb: if rx_ring { 4 } else { 0 },
            ..AfPacketOptions::default()
        },
    )?)
}

fn arp_and_udp(rx_ring: bool) -> Result<()> {
    let tb = Testbed::new()?;
    let mut up = open_af_packet(&tb, rx_ring)?;
    assert_eq!(up.name(), tb.daemon_if);
    assert_eq!(up.mtu(), 1500);
    let if_mac = std::fs::read_to_string(format!("/sys/class/net/{}/address", tb.daemon_if))?;
    assert_eq!(
        mac_str(up.mac()),
        if_mac.trim(),
        "AF_PACKET uses the interface's MAC"
    );

    arp_exchange(&mut up, tb.netns(), &tb.peer_if, tb.daemon_ip4)?;

    // A burst from the peer comes back in batches, not one frame per call.
    let mut sender = send_udp(tb.netns(), tb.daemon_ip4, 100)?;
    sender.success(T)?;
    let mac = up.mac();
    let (mut got, mut biggest) = (0, 0);
    let t0 = Instant::now();
    while got < 100 && t0.elapsed() < T {
        let mut marked = 0;
        let n = up.recv_batch(64, &mut |f, _| {
            marked += usize::from(is_marked_udp(f, mac, tb.daemon_ip4));
        })?;
        got += marked;
        biggest = biggest.max(n);
        if n == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    ensure!(got == 100, "received {got} of 100 datagrams");
    ensure!(biggest > 1, "recv_batch never returned more than one frame");
    let st = up.stats();
    ensure!(st.rx_truncated == 0, "truncated frames: {st:?}");
    ensure!(st.rx_syscalls < st.rx_frames, "no batching: {st:?}");
    if rx_ring {
        // Every frame came from the mapped ring, without a system call.
        ensure!(
            st.rx_ring_frames == st.rx_frames && st.rx_syscalls == 0,
            "{st:?}"
        );
    } else {
        ensure!(st.rx_ring_frames == 0, "{st:?}");
    }
    Ok(())
}

fn peer_rx_packets(tb: &Testbed) -> Result<u64> {
    let out = tb
        .peer_cmd(
            "cat",
            &[&format!(
                "/sys/class/net/{}/statistics/rx_packets",
                tb.peer_if
            )],
        )
        .output()?;
    ensure!(out.status.success(), "reading the peer's rx_packets");
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

#[test]
fn af_packet_sends_in_batches_and_never_hears_itself() -> Result<()> {
    sends_in_batches(false)
}

#[test]
fn af_packet_rx_ring_never_hears_itself() -> Result<()> {
    sends_in_batches(true)
}

fn sends_in_batches(rx_ring: bool) -> Result<()> {
    let tb = Testbed::new()?;
    let mut up = open_af_packet(&tb, rx_ring)?;
    let mac = up.mac();
    let rx0 = peer_rx_packets(&tb)?;

    // 200 frames: three automatic flushes of 64 and a final explicit one.
    for i in 0..200u32 {
        let b = up.tx_frame(64);
        b[..6].fill(0xff);
        b[6..12].copy_from_slice(&mac);
        b[12..14].copy_from_slice(&ETH_TEST.to_be_bytes());
        b[14..18].copy_from_slice(&i.to_be_bytes());
        b[18..18 + MARK.len()].copy_from_slice(MARK);
    }
    up.flush()?;
    let st = up.stats();
    ensure!(st.tx_frames + st.tx_dropped == 200, "{st:?}");
    ensure!(
        st.tx_frames >= 190,
        "too many drops on an idle veth: {st:?}"
    );
    ensure!(st.tx_syscalls <= 8, "not batched: {st:?}");
    wait_for("the peer to count our frames", T, || {
        Ok(peer_rx_packets(&tb)? >= rx0 + st.tx_frames)
    })?;

    // None of them comes back as input.
    let looped = recv_until(&mut up, Duration::from_millis(300), |f| {
        f.len() >= 14 && f[6..12] == mac
    })?;
    ensure!(!looped, "our own frame came back through recv_batch");
    // An empty flush is a no-op.
    up.flush()?;
    ensure!(up.stats().tx_syscalls == st.tx_syscalls);

    // Nor does a frame another socket sends out through the qdisc (where
    // packet taps see it as PACKET_OUTGOING).
    let rx1 = peer_rx_packets(&tb)?;
    let py = format!(
        "import socket\n\
         s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n\
         s.bind(('{}', 0))\n\
         s.send(bytes.fromhex('ffffffffffff020000000001{ETH_TEST:04x}') + bytes(50))\n",
        tb.daemon_if
    );
    let mut c = std::process::Command::new("python3");
    c.args(["-c", &py]);
    ChildGuard::spawn(&mut c, "python3 raw sender")?.success(T)?;
    wait_for("the peer to count the raw frame", T, || {
        Ok(peer_rx_packets(&tb)? > rx1)
    })?;
    let heard = recv_until(&mut up, Duration::from_millis(300), |f| {
        ethertype(f) == ETH_TEST
    })?;
    ensure!(!heard, "an outgoing frame came back through recv_batch");
    Ok(())
}

#[test]
fn tap_answers_arp_after_moving_into_a_namespace() -> Result<()> {
    let ns = Netns::new()?;
    let name = format!("hst{}", unique_tag());
    let mut up = Tap::open(&name, &TapOptions::default())?;
    assert_eq!(up.name(), name);
    let mac = up.mac();
    ensure!(
        mac[0] & 0x03 == 0x02,
        "not a local unicast MAC: {}",
        mac_str(mac)
    );

    // The fd keeps working after the netdev moves; the move takes it down.
    hoststack_tests::run(&["ip", "link", "set", &name, "netns", &ns.name])?;
    let (ours, theirs) = (Ipv4Addr::new(198, 19, 0, 1), Ipv4Addr::new(198, 19, 0, 2));
    ns.ip(&["addr", "add", &format!("{theirs}/24"), "dev", &name])?;
    ns.ip(&["link", "set", &name, "up"])?;

    let kernel_mac = arp_exchange(&mut up, &ns, &name, ours)?;
    ensure!(
        kernel_mac != mac,
        "the daemon's MAC must differ from the kernel side's"
    );

    // TX of a frame the kernel ignores still counts; nothing echoes back.
    let b = up.tx_frame(60);
    b.fill(0);
    b[..6].copy_from_slice(&kernel_mac);
    b[6..12].copy_from_slice(&mac);
    b[12..14].copy_from_slice(&ETH_TEST.to_be_bytes());
    let before = up.stats();
    up.flush()?;
    ensure!(up.stats().tx_frames == before.tx_frames + 1);
    let looped = recv_until(&mut up, Duration::from_millis(200), |f| {
        f.len() >= 14 && f[6..12] == mac
    })?;
    ensure!(!looped, "our own frame came back through the TAP");
    Ok(())
}

#[test]
fn tap_with_a_given_mac() -> Result<()> {
    let name = format!("hst{}", unique_tag());
    let mac = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];
    let up = Tap::open(&name, &TapOptions { mac: Some(mac) })?;
    assert_eq!(up.mac(), mac);
    ensure!(up.mtu() >= 576);
    drop(up);
    // Not persistent: the TAP is gone with its fd.
    wait_for("the TAP to disappear", T, || {
        Ok(!std::path::Path::new(&format!("/sys/class/net/{name}")).exists())
    })
}

#[test]
fn errors_name_the_interface() {
    let missing = format!("hsnone{}", std::process::id());
    match AfPacket::open(&missing, &AfPacketOptions::default()) {
        Err(e @ UplinkError::NotFound(_)) => {
            assert_eq!(e.to_string(), format!("interface {missing} not found"));
        }
        Err(e) => panic!("expected NotFound, got {e}"),
        Ok(_) => panic!("opened a missing interface"),
    }
    let long = "a-name-far-too-long-for-linux";
    assert!(matches!(
        AfPacket::open(long, &AfPacketOptions::default()),
        Err(UplinkError::BadName(_))
    ));
    assert!(matches!(
        Tap::open(long, &TapOptions::default()),
        Err(UplinkError::BadName(_))
    ));
    assert!(matches!(
        hoststack::uplink::open(hoststack::uplink::UplinkKind::AfPacket, "", None, true, 64),
        Err(UplinkError::BadName(_))
    ));
}
