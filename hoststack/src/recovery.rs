//! Loss recovery that smoltcp's TCP lacks, driven from outside the socket.
//!
//! smoltcp 0.14 retransmits one segment on three duplicate ACKs and
//! otherwise waits for its retransmission timer, which never fires sooner
//! than 1 s (Linux: 200 ms) and backs off from there. Two common losses
//! therefore cost a second or more each:
//!
//! * a loss at the tail of a flight (or of a whole TSO super-frame, the
//!   usual case on a veth): nothing follows it, so no duplicate ACKs come;
//! * a second hole in one window: the first retransmission is answered by
//!   a partial ACK, after which smoltcp waits for three new duplicates.
//!
//! The stack watches each connection's segments both ways (sans-IO: this
//! module sees only parsed headers and times) and, when it decides a
//! segment is lost, feeds the peer's last ACK (without payload) to the socket three more
//! times. smoltcp takes them for duplicate ACKs and retransmits the first
//! unacknowledged segment at once. The decisions:
//!
//! * **Probe timeout** (as Linux's tail loss probe): data outstanding and no
//!   ACK of new data for `max(2 * srtt, 2 ms)`, doubling per probe without
//!   progress, at most [`MAX_PTO`] (well below smoltcp's 1 s timer).
//! * **Partial ACK** (NewReno, RFC 6582): while recovering (a retransmission
//!   was seen), an ACK that moves forward but not past the highest sequence
//!   sent before the loss retransmits the next hole at once.
//!
//! Each replayed ACK also goes through smoltcp's congestion control as a
//! loss (the window is cut on entering recovery, as it should be).
//!
//! A third gap: smoltcp grows its congestion window by at most one segment
//! per ACK, and a Linux peer acknowledges a whole TSO super-frame (merged
//! by GRO) with one ACK. Slow start turns linear and the window takes
//! ages to come back after a loss. A large cumulative ACK is therefore
//! shown to the socket in up to eight steps first ([`Recovery::split`]).

use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{
    EthernetFrame, EthernetProtocol, IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket,
};

/// Longest probe timeout: keep ahead of smoltcp's own timer (1 s minimum).
pub const MAX_PTO: Duration = Duration::from_millis(800);
/// A flight this small (about one segment) may be waiting for the peer's
/// delayed ACK rather than lost: its probe waits that much longer.
const SMALL_FLIGHT: u32 = 2 * 1460;
/// The longest delayed ACK to allow for (Linux's maximum; a hoststack peer
/// delays at most `tcp.ack_delay_max_ms`, 100 ms by default).
const DELAYED_ACK: Duration = Duration::from_millis(200);
/// Shortest probe timeout (Linux's TLP floor, `TCP_TIMEOUT_MIN_US`).
const MIN_PTO: Duration = Duration::from_millis(2);
/// Probe timeout before the first RTT sample.
const INITIAL_PTO: Duration = Duration::from_millis(100);
/// Largest ACK frame kept for replay (Ethernet + IPv6 + TCP with options).
const MAX_ACK_FRAME: usize = 14 + 40 + 60;

/// The parts of a TCP segment recovery looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Sequence number.
    pub seq: u32,
    /// Sequence space it occupies (payload, plus one each for SYN and FIN).
    pub len: u32,
    /// Acknowledgment number, if ACK is set.
    pub ack: Option<u32>,
    /// Advertised window (unscaled field).
    pub win: u16,
    /// SYN or RST set (recovery leaves those alone).
    pub syn_or_rst: bool,
    /// SYN set (and RST not).
    pub syn: bool,
    /// A SYN's MSS option.
    pub mss: Option<u16>,
    /// A SYN's timestamp option is there.
    pub ts: bool,
    /// FIN set.
    pub fin: bool,
    /// Where the TCP header starts in the frame.
    tcp_off: usize,
    /// Where it ends.
    hdr_end: usize,
    /// IPv4 (else IPv6): where the IP length field is.
    v4: bool,
}

/// Parse the TCP segment in an Ethernet frame (IPv4 without fragments, or
/// IPv6 without extension headers).
pub fn parse(frame: &[u8]) -> Option<Seg> {
    let eth = EthernetFrame::new_checked(frame).ok()?;
    let payload = match eth.ethertype() {
        EthernetProtocol::Ipv4 => {
            let ip = Ipv4Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
                return None;
            }
            ip.payload()
        }
        EthernetProtocol::Ipv6 => {
            let ip = Ipv6Packet::new_checked(eth.payload()).ok()?;
            if ip.next_header() != IpProtocol::Tcp {
                return None;
            }
            ip.payload()
        }
        _ => return None,
    };
    let t = TcpPacket::new_checked(payload).ok()?;
    let hdr = usize::from(t.header_len());
    let (mut mss, mut ts) = (None, false);
    if t.syn() {
        let o = t.options();
        let mut i = 0;
        while let Some(&kind) = o.get(i) {
            match kind {
                0 => break,
                1 => i += 1,
                _ => {
                    let n = usize::from(*o.get(i + 1).unwrap_or(&0));
                    if n < 2 || i + n > o.len() {
                        break;
                    }
                    match (kind, n) {
                        (2, 4) => mss = Some(u16::from_be_bytes([o[i + 2], o[i + 3]])),
                        (8, 10) => ts = true,
                        _ => {}
                    }
                    i += n;
                }
            }
        }
    }
    let data = payload.len().checked_sub(hdr)? as u32;
    // Where the TCP header starts in the frame.
    let tcp_off = payload.as_ptr() as usize - frame.as_ptr() as usize;
    Some(Seg {
        tcp_off,
        hdr_end: tcp_off + hdr,
        v4: eth.ethertype() == EthernetProtocol::Ipv4,
        seq: t.seq_number().0 as u32,
        len: data + u32::from(t.syn()) + u32::from(t.fin()),
        ack: t.ack().then(|| t.ack_number().0 as u32),
        win: t.window_len(),
        syn_or_rst: t.syn() || t.rst(),
        syn: t.syn() && !t.rst(),
        mss,
        ts,
        fin: t.fin(),
    })
}

/// Copy `frame` (parsed as `s`) without its TCP payload into `out`, IP
/// length fixed up (the stack does not verify IP or TCP checksums of what
/// it feeds smoltcp itself). False if too large to keep.
fn header_copy(s: &Seg, frame: &[u8], out: &mut Vec<u8>) -> bool {
    let end = s.hdr_end;
    if end > MAX_ACK_FRAME || end > frame.len() {
        return false;
    }
    out.clear();
    out.extend_from_slice(&frame[..end]);
    if s.v4 {
        let total = (end - 14) as u16;
        out[16..18].copy_from_slice(&total.to_be_bytes());
    } else {
        let plen = (end - 14 - 40) as u16;
        out[18..20].copy_from_slice(&plen.to_be_bytes());
    }
    true
}

/// Most pieces one cumulative ACK is split into (see [`Recovery::split`]).
const MAX_PIECES: u32 = 8;
/// Segment size assumed when splitting.
const SPLIT_MSS: u32 = 1448;

/// `a` after `b` in sequence space.
fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

/// The intermediate ACKs to show the socket before a large cumulative one
/// (see [`Recovery::split`]).
#[derive(Debug, Clone, Copy)]
pub struct AckSteps {
    /// Offset of the acknowledgment number in the template.
    off: usize,
    una: u32,
    step: u32,
    /// Intermediate ACKs.
    pub count: u32,
}

impl AckSteps {
    /// Turn the template into the `k`-th intermediate ACK (1-based).
    pub fn set(&self, template: &mut [u8], k: u32) {
        let a = self.una.wrapping_add(self.step * k);
        template[self.off..self.off + 4].copy_from_slice(&a.to_be_bytes());
    }
}

/// Per-connection recovery state (sender side).
#[derive(Debug, Default)]
pub struct Recovery {
    /// One past the highest sequence number sent.
    snd_max: Option<u32>,
    /// Highest ACK from the peer.
    snd_una: Option<u32>,
    /// While recovering: the `snd_max` when the loss was found; recovery
    /// ends when the peer acknowledges it.
    recover: Option<u32>,
    /// When the peer last acknowledged new data, or when data was first
    /// outstanding after none was.
    progress_at: Option<Instant>,
    /// Probes sent since the last progress.
    probes: u32,
    /// Smoothed RTT.
    srtt: Option<Duration>,
    /// One RTT sample in flight: (sequence it ends at, sent at). Dropped on
    /// any retransmission (Karn).
    sample: Option<(u32, Instant)>,
    /// The peer's last ACK, without payload (a duplicate ACK to replay).
    last_ack: Vec<u8>,
    /// Its acknowledgment number.
    last_ack_no: u32,
    /// Where its window field is.
    last_ack_win: usize,
    /// Replays done (segments retransmitted on our decision).
    pub replays: u64,
    /// ARP requests / neighbour solicitations sent while smoltcp tried to
    /// send for this connection (its next hop was unknown).
    pub neighbor_probes: u32,
    /// The peer's MSS, from its SYN (after clamping to the link).
    pub peer_mss: Option<u16>,
    /// The peer's SYN offered timestamps.
    pub peer_ts: bool,
    /// The sequence number of our SYN, once one went out: a connect whose
    /// SYN never left waits for the neighbour, and an ICMP error about a
    /// connect must quote it.
    pub syn_seq: Option<u32>,
}

impl Recovery {
    fn outstanding(&self) -> bool {
        matches!((self.snd_una, self.snd_max), (Some(u), Some(m)) if after(m, u))
    }

    /// A segment we sent.
    pub fn on_sent(&mut self, s: &Seg, now: Instant) {
        if s.syn {
            self.syn_seq.get_or_insert(s.seq);
        }
        if s.syn_or_rst || s.len == 0 {
            return;
        }
        let end = s.seq.wrapping_add(s.len);
        let max = self.snd_max.unwrap_or(s.seq);
        if after(max, s.seq) {
            // A retransmission (ours or smoltcp's own).
            self.sample = None;
            if self.recover.is_none() {
                self.recover = Some(max);
            }
        } else if self.sample.is_none() {
            self.sample = Some((end, now));
        }
        if after(end, max) || self.snd_max.is_none() {
            self.snd_max = Some(end);
        }
        if self.progress_at.is_none() && self.outstanding() {
            self.progress_at = Some(now);
        }
    }

    /// A segment from the peer, already processed by the socket. Returns
    /// true when the socket should see `frame` three more times (a partial
    /// ACK while recovering: retransmit the next hole now).
    pub fn on_received(&mut self, s: &Seg, frame: &[u8], now: Instant) -> bool {
        if s.syn_or_rst {
            // A reset ends everything; a SYN-ACK (we connected) starts the
            // count.
            *self = Recovery {
                replays: self.replays,
                syn_seq: self.syn_seq,
                peer_mss: self.peer_mss,
                peer_ts: self.peer_ts,
                ..Recovery::default()
            };
            if let Some(a) = s.ack {
                self.snd_una = Some(a);
                self.snd_max = Some(a);
            }
            return false;
        }
        let Some(ack) = s.ack else { return false };
        // Any ACK can serve as a template: a copy without payload is what a
        // duplicate ACK looks like. Not a FIN (it would be counted again),
        // nor a zero window (smoltcp probes that itself).
        let usable = !s.fin && s.win > 0 && header_copy(s, frame, &mut self.last_ack);
        if usable {
            self.last_ack_no = ack;
            self.last_ack_win = s.tcp_off + 14;
        } else if self.last_ack_no != ack {
            self.last_ack.clear();
        }
        let una = *self.snd_una.get_or_insert(ack);
        if !after(ack, una) {
            return false;
        }
        // New data acknowledged.
        self.snd_una = Some(ack);
        if self.snd_max.is_none_or(|m| after(ack, m)) {
            self.snd_max = Some(ack);
        }
        self.probes = 0;
        self.progress_at = self.outstanding().then_some(now);
        if let Some((end, at)) = self.sample {
            if !after(end, ack) {
                let rtt = now - at;
                self.srtt = Some(match self.srtt {
                    Some(s) => (s * 7 + rtt) / 8,
                    None => rtt,
                });
                self.sample = None;
            }
        }
        match self.recover {
            // Past everything sent before the loss: recovered.
            Some(r) if !after(r, ack) => {
                self.recover = None;
                false
            }
            // A partial ACK.
            Some(_) if usable => {
                self.replays += 1;
                true
            }
            _ => false,
        }
    }

    fn pto(&self) -> Duration {
        let mut base = match self.srtt {
            Some(s) => (s * 2).max(MIN_PTO),
            None => INITIAL_PTO,
        };
        let flight = match (self.snd_una, self.snd_max) {
            (Some(u), Some(m)) => m.wrapping_sub(u),
            _ => 0,
        };
        if flight <= SMALL_FLIGHT {
            // As in RFC 8985 (RACK-TLP): a lone segment's ACK may be held
            // back by the peer's delayed-ACK timer. Probing earlier would
            // retransmit the last answer of every idle connection.
            base += DELAYED_ACK;
        }
        (base * (1u32 << self.probes.min(6))).min(MAX_PTO)
    }

    /// One ACK from the peer often covers a whole TSO super-frame (the
    /// peer's GRO merged it), and smoltcp's congestion control grows the
    /// window by at most one segment per ACK: slow start becomes linear
    /// and recovery after a loss takes far longer than it should. Before
    /// the socket sees such an ACK it is shown ACKs of the intermediate
    /// points: copies of `frame` without payload whose acknowledgment
    /// numbers step up to the real one, at most eight of them.
    /// Writes the template (the frame without payload) into `template`
    /// and returns the steps; [`AckSteps::set`] makes each one from it.
    pub fn split(&self, s: &Seg, frame: &[u8], template: &mut Vec<u8>) -> Option<AckSteps> {
        let (ack, una) = (s.ack?, self.snd_una?);
        if s.syn_or_rst || s.fin || s.win == 0 || !after(ack, una) {
            return None;
        }
        let delta = ack.wrapping_sub(una);
        if delta <= 2 * SPLIT_MSS {
            return None;
        }
        let pieces = (delta / SPLIT_MSS).min(MAX_PIECES);
        if !header_copy(s, frame, template) {
            return None;
        }
        Some(AckSteps {
            off: s.tcp_off + 8,
            una,
            step: delta / pieces,
            count: pieces - 1,
        })
    }

    /// When the next probe is due, if data is outstanding.
    pub fn deadline(&self) -> Option<Instant> {
        if !self.outstanding() || self.last_ack.is_empty() {
            return None;
        }
        Some(self.progress_at? + self.pto())
    }

    /// At `now`: is a probe due? Then [`Recovery::replay_frame`] (the
    /// peer's last ACK, which still names the first unacknowledged byte) is
    /// to be shown to the socket three times.
    pub fn probe(&mut self, now: Instant) -> bool {
        if self.deadline().is_none_or(|d| d > now) || Some(self.last_ack_no) != self.snd_una {
            return false;
        }
        self.probes += 1;
        self.progress_at = Some(now);
        if self.recover.is_none() {
            self.recover = self.snd_max;
        }
        self.sample = None;
        self.replays += 1;
        true
    }

    /// The peer's SYN (or SYN-ACK): what it offered.
    pub fn peer_syn(&mut self, s: &Seg) {
        self.peer_mss = s.mss.filter(|&m| m != 0);
        self.peer_ts = s.ts;
    }

    /// The frame to replay (see [`Recovery::probe`],
    /// [`Recovery::on_received`]).
    pub fn replay_frame(&self) -> &[u8] {
        &self.last_ack
    }

    /// The frames that make smoltcp retransmit once, whatever its count of
    /// duplicate ACKs, in order. It retransmits when the count reaches
    /// exactly three and counts on through later duplicates (an earlier
    /// replay's, or the peer's own), so a second probe without progress in
    /// between would do nothing. An ACK that changes the window is no
    /// duplicate and resets the count: first the replay frame with its
    /// window one unit off, then the frame itself (the change back: count
    /// zero), then three duplicates. The window ends as the peer sent it.
    pub fn replay_frames(&self) -> [Vec<u8>; 5] {
        let f = self.last_ack.clone();
        let mut nudged = f.clone();
        let w = self.last_ack_win;
        if let Some(b) = nudged.get_mut(w..w + 2) {
            let win = u16::from_be_bytes([b[0], b[1]]);
            // Never zero: smoltcp would start probing a closed window.
            let other = if win > 1 { win - 1 } else { win + 1 };
            b.copy_from_slice(&other.to_be_bytes());
        }
        [nudged, f.clone(), f.clone(), f.clone(), f]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real IPv4 segment from the peer: ACK `ack`, `data` bytes of
    /// payload, window `win`.
    fn frame(ack: u32, data: usize, win: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + data];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((40 + data) as u16).to_be_bytes());
        f[22] = 64;
        f[23] = 6;
        let t = 34;
        f[t + 4..t + 8].copy_from_slice(&1u32.to_be_bytes());
        f[t + 8..t + 12].copy_from_slice(&ack.to_be_bytes());
        f[t + 12] = 0x50;
        f[t + 13] = 0x10;
        f[t + 14..t + 16].copy_from_slice(&win.to_be_bytes());
        f
    }

    /// Feed `frame` as received; returns the replay decision.
    fn rx(r: &mut Recovery, f: &[u8], ms: u64) -> bool {
        let s = parse(f).expect("a TCP frame");
        r.on_received(&s, f, t(ms))
    }

    fn sent(seq: u32, len: u32) -> Seg {
        Seg {
            seq,
            len,
            ack: Some(1),
            win: 1000,
            syn_or_rst: false,
            syn: false,
            mss: None,
            ts: false,
            fin: false,
            tcp_off: 34,
            hdr_end: 54,
            v4: true,
        }
    }

    fn t(ms: u64) -> Instant {
        Instant::from_millis(ms as i64)
    }

    #[test]
    fn a_tail_loss_is_probed_after_twice_the_rtt_and_backs_off() {
        let mut r = Recovery::default();
        rx(&mut r, &frame(1000, 0, 1000), 0);
        r.on_sent(&sent(1000, 10_000), t(0));
        // The first flight's ACK gives an RTT sample of 20 ms.
        assert!(!rx(&mut r, &frame(11_000, 0, 1000), 20));
        assert_eq!(r.deadline(), None, "nothing outstanding");
        // A TSO super-frame, lost whole: nothing can follow it.
        r.on_sent(&sent(11_000, 10_000), t(20));
        assert_eq!(r.deadline(), Some(t(60)));
        assert!(!r.probe(t(59)));
        assert!(r.probe(t(60)));
        assert_eq!(parse(r.replay_frame()).and_then(|s| s.ack), Some(11_000));
        // No progress: the next probe waits twice as long.
        assert_eq!(r.deadline(), Some(t(140)));
        assert!(r.probe(t(140)));
        assert_eq!(r.deadline(), Some(t(300)));
        // The retransmissions get through: recovery ends.
        r.on_sent(&sent(11_000, 1460), t(140));
        assert!(!rx(&mut r, &frame(21_000, 0, 1000), 160));
        assert_eq!(r.deadline(), None);
        assert!(r.recover.is_none());
        assert_eq!(r.replays, 2);
        // One small segment out: allow for the peer's delayed ACK.
        r.on_sent(&sent(21_000, 100), t(200));
        assert_eq!(r.deadline(), Some(t(200 + 40 + 200)));
    }

    #[test]
    fn on_a_fast_link_the_probe_comes_after_two_milliseconds() {
        let mut r = Recovery::default();
        rx(&mut r, &frame(1000, 0, 1000), 0);
        // A sub-millisecond RTT (a veth): 2 x srtt is below the floor.
        r.on_sent(&sent(1000, 10_000), t(100));
        assert!(!rx(&mut r, &frame(11_000, 0, 1000), 100));
        r.on_sent(&sent(11_000, 10_000), t(100));
        assert_eq!(r.deadline(), Some(t(102)));
    }

    #[test]
    fn a_replay_resets_the_duplicate_count_before_its_three_duplicates() {
        let mut r = Recovery::default();
        rx(&mut r, &frame(1000, 0, 1000), 0);
        let w = |f: &Vec<u8>| parse(f).map(|s| (s.ack, s.win, s.len));
        let frames = r.replay_frames();
        // A window change (not a duplicate), the change back, then the
        // same ACK three times: exactly three duplicates whatever came
        // before.
        assert_eq!(w(&frames[0]), Some((Some(1000), 999, 0)));
        for f in &frames[1..] {
            assert_eq!(w(f), Some((Some(1000), 1000, 0)));
        }
        // A window of one never becomes zero.
        rx(&mut r, &frame(1000, 0, 1), 1);
        assert_eq!(w(&r.replay_frames()[0]), Some((Some(1000), 2, 0)));
    }

    #[test]
    fn a_partial_ack_while_recovering_asks_for_the_next_hole() {
        let mut r = Recovery::default();
        rx(&mut r, &frame(1000, 0, 1000), 0);
        for i in 0..10 {
            r.on_sent(&sent(1000 + i * 100, 100), t(0));
        }
        // Segments 0 and 5 lost: smoltcp retransmits 0 after dup ACKs.
        r.on_sent(&sent(1000, 100), t(1));
        // The ACK now stops at the second hole: a partial ACK, even one
        // that carries data (its copy without payload is replayed).
        assert!(rx(&mut r, &frame(1500, 30, 1000), 2));
        let f = r.replay_frame().to_vec();
        let s = parse(&f).unwrap();
        assert_eq!((s.ack, s.len), (Some(1500), 0));
        // Past everything sent before the loss: done.
        assert!(!rx(&mut r, &frame(2000, 0, 1000), 3));
        assert!(r.recover.is_none());
    }

    #[test]
    fn an_ack_of_a_whole_super_frame_is_shown_to_the_socket_in_steps() {
        let mut r = Recovery::default();
        rx(&mut r, &frame(1000, 0, 1000), 0);
        r.on_sent(&sent(1000, 64_000), t(0));
        // The intermediate ACKs, each made from the template in turn.
        let split = |r: &Recovery, f: &[u8], out: &mut Vec<Vec<u8>>| -> u32 {
            out.clear();
            let mut tmpl = Vec::new();
            let Some(steps) = r.split(&parse(f).unwrap(), f, &mut tmpl) else {
                return 0;
            };
            for k in 1..=steps.count {
                steps.set(&mut tmpl, k);
                out.push(tmpl.clone());
            }
            steps.count
        };
        let mut out = Vec::new();
        // 64 000 bytes acknowledged at once (with 30 bytes of data): seven
        // intermediate ACKs without payload, then the real one.
        let f = frame(65_000, 30, 1000);
        assert_eq!(split(&r, &f, &mut out), 7);
        let acks: Vec<_> = out.iter().map(|p| parse(p).unwrap()).collect();
        assert!(acks.iter().all(|a| a.len == 0 && a.win == 1000));
        assert_eq!(
            acks.iter().map(|a| a.ack.unwrap()).collect::<Vec<_>>(),
            (1..8).map(|k| 1000 + k * 8000).collect::<Vec<_>>()
        );
        // Two segments' worth or less: as it is.
        let f = frame(3_800, 0, 1000);
        assert_eq!(split(&r, &f, &mut out), 0);
        // Nor a FIN, a zero window, or an old ACK.
        let f = frame(65_000, 0, 0);
        assert_eq!(split(&r, &f, &mut out), 0);
        let f = frame(900, 0, 1000);
        assert_eq!(split(&r, &f, &mut out), 0);
    }

    #[test]
    fn zero_windows_and_stale_templates_are_never_replayed() {
        let mut r = Recovery::default();
        rx(&mut r, &frame(1000, 0, 1000), 0);
        r.on_sent(&sent(1000, 500), t(0));
        r.on_sent(&sent(1000, 500), t(1));
        // A zero window is smoltcp's to probe; the old template is stale.
        assert!(!rx(&mut r, &frame(1200, 0, 0), 2));
        assert!(r.last_ack.is_empty());
        assert!(!r.probe(t(1000)));
        // A usable ACK of the same byte brings probing back.
        assert!(!rx(&mut r, &frame(1200, 0, 1000), 3));
        assert!(r.probe(t(1000)));
    }
}
