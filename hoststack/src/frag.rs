//! IP fragmentation and reassembly, and TCP MSS clamping (sans-IO).
//!
//! smoltcp 0.14 reassembles at most one IPv4 datagram at a time, cannot
//! fragment IPv6 at all, and drops an IPv4 datagram larger than the MTU
//! unless its own fragmenter (one datagram at a time, sent across several
//! polls) is built in. A UDP datagram larger than the link MTU (DNS with
//! EDNS, NFS, SIP, media) was therefore lost without a word in either
//! direction. The stack does both itself, as a host does (RFC 791, RFC 8200):
//!
//! * **Send**: smoltcp's interface is given a large MTU
//!   ([`MAX_FRAME`]) so it hands over whole datagrams, and [`fragment`] cuts
//!   an oversized one to the link MTU on its way to the uplink (IPv4: header
//!   copies with offsets and the more-fragments flag; IPv6: a Fragment
//!   extension header). TCP is unaffected: its segments follow the peer's
//!   MSS, which [`clamp_mss`] keeps within the link MTU on SYNs in both
//!   directions (the MSS smoltcp would offer is derived from the large
//!   MTU, so outgoing SYNs are clamped too).
//! * **Receive**: [`Reassembler`] collects fragments addressed to us and
//!   gives back the whole datagram as one frame, which then takes the
//!   normal path (checksums, demultiplexing, smoltcp). It is bounded:
//!   [`MAX_DATAGRAMS`] datagrams and [`MAX_BYTES`] of buffers at once (the
//!   oldest goes first), [`TIMEOUT`] per datagram; overlapping fragments
//!   discard the datagram (RFC 5722; Linux does the same for IPv4).

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
};
use std::collections::HashMap;

/// Largest frame smoltcp may hand over (Ethernet header + 64 KiB IP packet).
pub const MAX_FRAME: usize = 14 + 65535;
/// Datagrams being reassembled at once, at most.
pub const MAX_DATAGRAMS: usize = 64;
/// Reassembly buffer bytes at once, at most.
pub const MAX_BYTES: usize = 4 << 20;
/// Fragments per datagram, at most (a 64 KiB datagram over a 576-byte
/// path is 115; the bound keeps each arrival's overlap check cheap).
pub const MAX_PIECES: usize = 256;
/// How long an incomplete datagram is kept (Linux `ipfrag_time`).
pub const TIMEOUT: Duration = Duration::from_secs(30);

const ETH: usize = 14;
const IPV6_HDR: usize = 40;
const FRAG_HDR: usize = 8;

/// Identifies one datagram being reassembled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    src: IpAddress,
    dst: IpAddress,
    /// IPv4: the protocol; IPv6: 0 (the id alone names the datagram).
    proto: u8,
    id: u32,
}

/// One datagram being reassembled.
#[derive(Debug)]
struct Entry {
    /// Ethernet + IP header for the whole datagram (from the first
    /// fragment), once that arrived.
    head: Vec<u8>,
    /// IPv6: the protocol after the Fragment header.
    next: u8,
    /// Payload bytes received, at their offsets.
    data: Vec<u8>,
    /// Ranges received, sorted, not overlapping.
    have: Vec<(usize, usize)>,
    /// Payload length, once the last fragment arrived.
    total: Option<usize>,
    started: Instant,
}

/// Counters for `hoststackctl`.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct FragStats {
    /// Fragments received.
    pub rx_fragments: u64,
    /// Datagrams reassembled.
    pub reassembled: u64,
    /// Datagrams discarded (timeout, overlap, malformed, limits).
    pub reassembly_dropped: u64,
}

/// A fragment of an IP datagram, parsed.
struct Piece<'a> {
    key: Key,
    v4: bool,
    /// Ethernet + IP header (IPv6: without the Fragment header).
    head: &'a [u8],
    next: u8,
    offset: usize,
    more: bool,
    payload: &'a [u8],
}

fn parse(frame: &[u8]) -> Option<Piece<'_>> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if !ip.more_frags() && ip.frag_offset() == 0 {
                return None;
            }
            let hl = usize::from(ip.header_len());
            Some(Piece {
                key: Key {
                    src: ip.src_addr().into(),
                    dst: ip.dst_addr().into(),
                    proto: ip.next_header().into(),
                    id: u32::from(ip.ident()),
                },
                v4: true,
                head: &frame[..ETH + hl],
                next: ip.next_header().into(),
                offset: usize::from(ip.frag_offset()),
                more: ip.more_frags(),
                payload: ip.payload(),
            })
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Ipv6Frag {
                return None;
            }
            let p = ip.payload();
            if p.len() < FRAG_HDR {
                return None;
            }
            let off_flags = u16::from_be_bytes([p[2], p[3]]);
            Some(Piece {
                key: Key {
                    src: ip.src_addr().into(),
                    dst: ip.dst_addr().into(),
                    proto: 0,
                    id: u32::from_be_bytes([p[4], p[5], p[6], p[7]]),
                },
                v4: false,
                head: &frame[..ETH + IPV6_HDR],
                next: p[0],
                offset: usize::from(off_flags & !7),
                more: off_flags & 1 == 1,
                payload: &p[FRAG_HDR..],
            })
        }
        _ => None,
    }
}

/// Whether `frame` is an IPv4 or IPv6 fragment (checked on every frame:
/// a few loads first, the full parse only for likely ones).
pub fn is_fragment(frame: &[u8]) -> bool {
    let likely = match frame.get(12..14) {
        // More-fragments flag or a fragment offset.
        Some([0x08, 0x00]) => frame
            .get(20..22)
            .is_some_and(|b| b[0] & 0x3f != 0 || b[1] != 0),
        // Next header: Fragment.
        Some([0x86, 0xdd]) => frame.get(20) == Some(&44),
        _ => false,
    };
    likely && parse(frame).is_some()
}

/// The destination address of a fragment.
pub fn destination(frame: &[u8]) -> Option<IpAddress> {
    parse(frame).map(|p| p.key.dst)
}

/// Reassembly of the fragments addressed to us.
#[derive(Debug, Default)]
pub struct Reassembler {
    entries: HashMap<Key, Entry>,
    bytes: usize,
    /// Counters.
    pub stats: FragStats,
}

impl Reassembler {
    fn drop_entry(&mut self, k: &Key) {
        if let Some(e) = self.entries.remove(k) {
            self.bytes -= e.data.capacity();
            self.stats.reassembly_dropped += 1;
        }
    }

    /// Discard datagrams older than [`TIMEOUT`].
    pub fn expire(&mut self, now: Instant) {
        let old: Vec<Key> = self
            .entries
            .iter()
            .filter(|(_, e)| now - e.started >= TIMEOUT)
            .map(|(k, _)| *k)
            .collect();
        for k in old {
            self.drop_entry(&k);
        }
    }

    /// Datagrams being reassembled.
    pub fn pending(&self) -> usize {
        self.entries.len()
    }

    /// Take one fragment. Returns the whole datagram as one frame when
    /// this fragment completed it. Non-fragments are ignored (`None`).
    pub fn push(&mut self, frame: &[u8], now: Instant) -> Option<Vec<u8>> {
        let p = parse(frame)?;
        self.stats.rx_fragments += 1;
        self.expire(now);
        let end = p.offset + p.payload.len();
        // All but the last fragment carry a multiple of 8 bytes; the whole
        // must fit the 16-bit length (IPv4: with its header).
        let limit = if p.v4 {
            65535 - (p.head.len() - ETH)
        } else {
            65535
        };
        if (p.more && p.payload.len() % 8 != 0) || end > limit || p.payload.is_empty() {
            if self.entries.contains_key(&p.key) {
                self.drop_entry(&p.key);
            } else {
                self.stats.reassembly_dropped += 1;
            }
            return None;
        }
        if !self.entries.contains_key(&p.key) {
            while self.entries.len() >= MAX_DATAGRAMS {
                let oldest = self
                    .entries
                    .iter()
                    .min_by_key(|(_, e)| e.started)
                    .map(|(k, _)| *k)?;
                self.drop_entry(&oldest);
            }
            self.entries.insert(
                p.key,
                Entry {
                    head: Vec::new(),
                    next: 0,
                    data: Vec::new(),
                    have: Vec::new(),
                    total: None,
                    started: now,
                },
            );
        }
        let e = self.entries.get_mut(&p.key)?;
        // An exact repeat changes nothing; any other overlap discards the
        // datagram.
        if e.have.contains(&(p.offset, end)) {
            return None;
        }
        let overlaps = e.have.iter().any(|&(a, b)| p.offset < b && a < end);
        let bad_total = match e.total {
            Some(t) => end > t || (!p.more && end != t),
            None => !p.more && e.have.iter().any(|&(_, b)| b > end),
        };
        if overlaps || bad_total || e.have.len() >= MAX_PIECES {
            self.drop_entry(&p.key);
            return None;
        }
        if end > e.data.len() {
            let before = e.data.capacity();
            e.data.resize(end, 0);
            self.bytes += e.data.capacity() - before;
        }
        e.data[p.offset..end].copy_from_slice(p.payload);
        let at = e.have.partition_point(|&(a, _)| a < p.offset);
        e.have.insert(at, (p.offset, end));
        if !p.more {
            e.total = Some(end);
        }
        if p.offset == 0 {
            e.head = p.head.to_vec();
            e.next = p.next;
        }
        if self.bytes > MAX_BYTES {
            self.drop_entry(&p.key);
            return None;
        }
        let e = self.entries.get(&p.key)?;
        let total = e.total?;
        let complete = !e.head.is_empty()
            && e.have.first().is_some_and(|&(a, _)| a == 0)
            && e.have.windows(2).all(|w| w[0].1 == w[1].0)
            && e.have.last().is_some_and(|&(_, b)| b == total);
        if !complete {
            return None;
        }
        let e = self.entries.remove(&p.key)?;
        self.bytes -= e.data.capacity();
        self.stats.reassembled += 1;
        Some(whole(&e, p.v4, total))
    }
}

/// The reassembled datagram as one frame.
fn whole(e: &Entry, v4: bool, total: usize) -> Vec<u8> {
    let mut f = Vec::with_capacity(e.head.len() + total);
    f.extend_from_slice(&e.head);
    f.extend_from_slice(&e.data[..total]);
    if v4 {
        let mut ip = Ipv4Packet::new_unchecked(&mut f[ETH..]);
        let hl = usize::from(ip.header_len());
        ip.set_total_len((hl + total) as u16);
        ip.set_more_frags(false);
        ip.set_frag_offset(0);
        ip.fill_checksum();
    } else {
        let mut ip = Ipv6Packet::new_unchecked(&mut f[ETH..]);
        ip.set_payload_len(total as u16);
        ip.set_next_header(IpProtocol::from(e.next));
    }
    f
}

/// Cut `frame` (Ethernet + IPv4 or IPv6) into fragments of at most `mtu`
/// IP bytes each, identified by `id`, and pass each to `out`. Returns the
/// number of fragments, or 0 if `frame` is no IP packet that can be cut
/// (nothing is passed then).
pub fn fragment(frame: &[u8], mtu: usize, id: u32, out: &mut dyn FnMut(&[u8])) -> usize {
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return 0;
    };
    match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                return 0;
            };
            let hl = usize::from(ip.header_len());
            let payload = ip.payload();
            let chunk = (mtu.saturating_sub(hl)) & !7;
            if chunk == 0 {
                return 0;
            }
            let mut buf = vec![0u8; ETH + hl + chunk];
            let mut n = 0;
            for (i, piece) in payload.chunks(chunk).enumerate() {
                let len = ETH + hl + piece.len();
                buf[..ETH + hl].copy_from_slice(&frame[..ETH + hl]);
                buf[ETH + hl..len].copy_from_slice(piece);
                let mut p = Ipv4Packet::new_unchecked(&mut buf[ETH..len]);
                p.set_total_len((hl + piece.len()) as u16);
                p.set_ident(id as u16);
                p.set_dont_frag(false);
                p.set_more_frags((i + 1) * chunk < payload.len());
                p.set_frag_offset((i * chunk) as u16);
                p.fill_checksum();
                out(&buf[..len]);
                n += 1;
            }
            n
        }
        EthernetProtocol::Ipv6 => {
            let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) else {
                return 0;
            };
            let next: u8 = ip.next_header().into();
            let payload = ip.payload();
            let chunk = (mtu.saturating_sub(IPV6_HDR + FRAG_HDR)) & !7;
            if chunk == 0 {
                return 0;
            }
            let mut buf = vec![0u8; ETH + IPV6_HDR + FRAG_HDR + chunk];
            let mut n = 0;
            for (i, piece) in payload.chunks(chunk).enumerate() {
                let len = ETH + IPV6_HDR + FRAG_HDR + piece.len();
                buf[..ETH + IPV6_HDR].copy_from_slice(&frame[..ETH + IPV6_HDR]);
                let more = (i + 1) * chunk < payload.len();
                let off_flags = ((i * chunk) as u16) | u16::from(more);
                let h = ETH + IPV6_HDR;
                buf[h] = next;
                buf[h + 1] = 0;
                buf[h + 2..h + 4].copy_from_slice(&off_flags.to_be_bytes());
                buf[h + 4..h + 8].copy_from_slice(&id.to_be_bytes());
                buf[h + FRAG_HDR..len].copy_from_slice(piece);
                let mut p = Ipv6Packet::new_unchecked(&mut buf[ETH..len]);
                p.set_payload_len((FRAG_HDR + piece.len()) as u16);
                p.set_next_header(IpProtocol::Ipv6Frag);
                out(&buf[..len]);
                n += 1;
            }
            n
        }
        _ => 0,
    }
}

/// Whether `frame` looks like a TCP SYN (a few loads, no parsing: the
/// test on every small frame before [`clamp_mss`] looks closer).
pub fn maybe_syn(frame: &[u8]) -> bool {
    let flags_at = match frame.get(12..14) {
        Some([0x08, 0x00]) if frame.get(23) == Some(&6) => {
            ETH + usize::from(frame.get(14).map_or(0, |b| b & 0xf)) * 4 + 13
        }
        Some([0x86, 0xdd]) if frame.get(20) == Some(&6) => ETH + IPV6_HDR + 13,
        _ => return false,
    };
    frame.get(flags_at).is_some_and(|f| f & 0x02 != 0)
}

/// If `frame` is a TCP SYN whose MSS option is above `mss`, lower it to
/// `mss` (refilling the TCP checksum if `fix_checksum`). True if changed.
pub fn clamp_mss(frame: &mut [u8], mss: u16, fix_checksum: bool) -> bool {
    let Ok(eth) = EthernetFrame::new_checked(&*frame) else {
        return false;
    };
    let (tcp_off, src, dst) = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let Ok(ip) = Ipv4Packet::new_checked(eth.payload()) else {
                return false;
            };
            if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
                return false;
            }
            (
                ETH + usize::from(ip.header_len()),
                IpAddress::from(ip.src_addr()),
                IpAddress::from(ip.dst_addr()),
            )
        }
        EthernetProtocol::Ipv6 => {
            let Ok(ip) = Ipv6Packet::new_checked(eth.payload()) else {
                return false;
            };
            if ip.next_header() != IpProtocol::Tcp {
                return false;
            }
            (
                ETH + IPV6_HDR,
                IpAddress::from(ip.src_addr()),
                IpAddress::from(ip.dst_addr()),
            )
        }
        _ => return false,
    };
    let Ok(mut t) = TcpPacket::new_checked(&mut frame[tcp_off..]) else {
        return false;
    };
    if !t.syn() {
        return false;
    }
    let opts = t.options_mut();
    let mut i = 0;
    let mut changed = false;
    while i < opts.len() {
        match opts[i] {
            0 => break,
            1 => i += 1,
            kind => {
                let Some(&len) = opts.get(i + 1) else { break };
                let len = usize::from(len);
                if len < 2 || i + len > opts.len() {
                    break;
                }
                if kind == 2 && len == 4 {
                    let v = u16::from_be_bytes([opts[i + 2], opts[i + 3]]);
                    if v > mss {
                        opts[i + 2..i + 4].copy_from_slice(&mss.to_be_bytes());
                        changed = true;
                    }
                }
                i += len;
            }
        }
    }
    if changed && fix_checksum {
        t.fill_checksum(&src, &dst);
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::wire::{Ipv4Address, Ipv6Address};

    /// An Ethernet frame with an IPv4 UDP datagram of `n` payload bytes.
    fn udp4(n: usize) -> Vec<u8> {
        let mut f = vec![0u8; ETH + 20 + 8 + n];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        {
            let mut ip = Ipv4Packet::new_unchecked(&mut f[ETH..]);
            ip.set_version(4);
            ip.set_header_len(20);
            ip.set_total_len((20 + 8 + n) as u16);
            ip.set_hop_limit(64);
            ip.set_next_header(IpProtocol::Udp);
            ip.set_dont_frag(true);
            ip.set_src_addr(Ipv4Address::new(198, 18, 0, 2));
            ip.set_dst_addr(Ipv4Address::new(198, 18, 0, 1));
            ip.fill_checksum();
        }
        for (i, b) in f[ETH + 28..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        f
    }

    fn udp6(n: usize) -> Vec<u8> {
        let mut f = vec![0u8; ETH + IPV6_HDR + 8 + n];
        f[12..14].copy_from_slice(&[0x86, 0xdd]);
        {
            let mut ip = Ipv6Packet::new_unchecked(&mut f[ETH..]);
            ip.set_version(6);
            ip.set_payload_len((8 + n) as u16);
            ip.set_next_header(IpProtocol::Udp);
            ip.set_hop_limit(64);
            ip.set_src_addr(Ipv6Address::new(0x2001, 2, 0, 0, 0, 0, 0, 2));
            ip.set_dst_addr(Ipv6Address::new(0x2001, 2, 0, 0, 0, 0, 0, 1));
        }
        for (i, b) in f[ETH + IPV6_HDR + 8..].iter_mut().enumerate() {
            *b = (i % 251) as u8;
        }
        f
    }

    fn cut(frame: &[u8], mtu: usize, id: u32) -> Vec<Vec<u8>> {
        let mut v = Vec::new();
        fragment(frame, mtu, id, &mut |p| v.push(p.to_vec()));
        v
    }

    #[test]
    fn ipv4_and_ipv6_datagrams_are_cut_to_the_mtu_and_put_back_together() {
        for (orig, v4) in [(udp4(4000), true), (udp6(4000), false)] {
            let frags = cut(&orig, 1500, 77);
            assert_eq!(frags.len(), 3);
            assert!(frags
                .iter()
                .all(|f| f.len() - ETH <= 1500 && is_fragment(f)));
            if v4 {
                let ip = Ipv4Packet::new_checked(&frags[1][ETH..]).unwrap();
                assert!(ip.verify_checksum() && !ip.dont_frag() && ip.more_frags());
                assert_eq!((ip.ident(), ip.frag_offset()), (77, 1480));
            }
            // Out of order, with a repeat: whole again, once.
            let mut r = Reassembler::default();
            let t = Instant::from_millis(0);
            assert_eq!(r.push(&frags[2], t), None);
            assert_eq!(r.push(&frags[0], t), None);
            assert_eq!(r.push(&frags[0], t), None);
            let whole = r.push(&frags[1], t).expect("complete");
            let mut expect = orig.clone();
            if v4 {
                // The reassembled header has no DF and a fresh checksum.
                let mut ip = Ipv4Packet::new_unchecked(&mut expect[ETH..]);
                ip.set_dont_frag(false);
                ip.set_ident(77);
                ip.fill_checksum();
            }
            assert_eq!(whole, expect);
            assert_eq!((r.pending(), r.bytes, r.stats.reassembled), (0, 0, 1));
        }
        // Small enough: not cut.
        assert!(!is_fragment(&udp4(100)));
    }

    #[test]
    fn overlaps_timeouts_and_limits_discard_datagrams() {
        let t = Instant::from_millis(0);
        let frags = cut(&udp4(4000), 1500, 1);
        // A fragment overlapping another (not a repeat) discards all.
        let mut r = Reassembler::default();
        r.push(&frags[0], t);
        let mut odd = frags[1].clone();
        Ipv4Packet::new_unchecked(&mut odd[ETH..]).set_frag_offset(1472);
        assert_eq!(r.push(&odd, t), None);
        assert_eq!((r.pending(), r.stats.reassembly_dropped), (0, 1));
        // An incomplete datagram goes after the timeout.
        r.push(&frags[0], t);
        r.expire(t + TIMEOUT);
        assert_eq!((r.pending(), r.bytes), (0, 0));
        // Many datagrams: at most MAX_DATAGRAMS kept, the oldest leave.
        for id in 0..MAX_DATAGRAMS as u32 + 10 {
            let f = cut(&udp4(3000), 1500, id);
            r.push(&f[0], Instant::from_millis(id as i64));
        }
        assert_eq!(r.pending(), MAX_DATAGRAMS);
        // Completing a survivor still works; an evicted one does not.
        let last = MAX_DATAGRAMS as u32 + 9;
        let f = cut(&udp4(3000), 1500, last);
        assert!(r.push(&f[1], t).is_none());
        assert!(r.push(&f[2], t).is_some());
        let f = cut(&udp4(3000), 1500, 0);
        assert!(r.push(&f[1], t).is_none() && r.push(&f[2], t).is_none());
        // Too many pieces (8-byte slivers): discarded.
        let big = udp4(4000);
        let mut slivers = 0;
        for i in 0..=MAX_PIECES {
            let mut f = big[..ETH + 20 + 8].to_vec();
            let mut ip = Ipv4Packet::new_unchecked(&mut f[ETH..]);
            ip.set_total_len(28);
            ip.set_ident(9999);
            ip.set_more_frags(true);
            ip.set_frag_offset((i * 8) as u16);
            ip.fill_checksum();
            r.push(&f, t);
            slivers += 1;
        }
        assert_eq!(slivers, MAX_PIECES + 1);
        assert!(
            r.entries.keys().all(|k| k.id != 9999),
            "kept {slivers} pieces"
        );
        // A non-final fragment whose length is no multiple of 8.
        let mut bad = frags[0].clone();
        let n = bad.len() - 3;
        bad.truncate(n);
        Ipv4Packet::new_unchecked(&mut bad[ETH..]).set_total_len((n - ETH) as u16);
        let before = r.stats.reassembly_dropped;
        assert_eq!(r.push(&bad, t), None);
        assert_eq!(r.stats.reassembly_dropped, before + 1);
    }

    #[test]
    fn the_mss_of_a_syn_is_lowered_to_the_link_and_its_checksum_refilled() {
        // IPv4 TCP SYN with options: NOP, NOP, MSS 65495, window scale.
        let mut f = vec![0u8; ETH + 20 + 32];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let src = Ipv4Address::new(198, 18, 0, 1);
        let dst = Ipv4Address::new(198, 18, 0, 2);
        {
            let mut ip = Ipv4Packet::new_unchecked(&mut f[ETH..]);
            ip.set_version(4);
            ip.set_header_len(20);
            ip.set_total_len(52);
            ip.set_next_header(IpProtocol::Tcp);
            ip.set_src_addr(src);
            ip.set_dst_addr(dst);
            ip.fill_checksum();
        }
        {
            let t = &mut f[ETH + 20..];
            t[12] = 8 << 4;
            t[13] = 0x02; // SYN
            t[20..32].copy_from_slice(&[1, 1, 2, 4, 0xff, 0xd7, 3, 3, 7, 1, 1, 0]);
            let mut p = TcpPacket::new_unchecked(&mut f[ETH + 20..]);
            p.fill_checksum(&src.into(), &dst.into());
        }
        assert!(maybe_syn(&f));
        assert!(clamp_mss(&mut f, 1460, true));
        let p = TcpPacket::new_checked(&f[ETH + 20..]).unwrap();
        assert_eq!(&f[ETH + 20 + 24..ETH + 20 + 26], &1460u16.to_be_bytes());
        assert!(p.verify_checksum(&src.into(), &dst.into()));
        // Already small enough, or not a SYN: untouched.
        assert!(!clamp_mss(&mut f, 1460, true));
        f[ETH + 20 + 13] = 0x10;
        assert!(!maybe_syn(&f) && !clamp_mss(&mut f, 536, true));
    }
}
