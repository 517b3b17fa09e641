//! IPv6 fragments whose Destination Options header travels in the
//! fragmentable part (after the Fragment header, as RFC 8200 allows and
//! senders with a routing header do): real fragments sent from a client
//! namespace through moat's XDP program on the worker, reassembled by the
//! worker's stack. The datagram goes to a port the policy allows, so the
//! worker's socket must receive it whole.

use std::{collections::BTreeMap, net::UdpSocket, time::Duration};

use moat::{
    compile::compile,
    dataplane::{frame::checksum, Dataplane, XdpAttachMode},
};
use moat_common::{counter, direction};
use moat_tests::{
    add_ipv6_pair, in_netns, load_fixture, mac_of, send_frame, worker_and_client, NODE,
};

const SRC: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const DST: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// A UDP datagram of `len` payload bytes from SRC:40000 to DST:`port`,
/// behind an 8-byte Destination Options header (PadN) in the
/// fragmentable part, cut into Ethernet frames of IPv6 fragments (at most
/// `chunk` bytes of fragmentable part each, a multiple of 8).
fn fragments(
    to_mac: [u8; 6],
    from_mac: [u8; 6],
    port: u16,
    len: usize,
    chunk: usize,
) -> Vec<Vec<u8>> {
    let mut udp = Vec::new();
    udp.extend_from_slice(&40000u16.to_be_bytes());
    udp.extend_from_slice(&port.to_be_bytes());
    udp.extend_from_slice(&((8 + len) as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend((0..len).map(|i| i as u8));
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&SRC);
    pseudo.extend_from_slice(&DST);
    pseudo.extend_from_slice(&(udp.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&udp);
    let sum = match checksum(&pseudo) {
        0 => 0xffff,
        s => s,
    };
    udp[6..8].copy_from_slice(&sum.to_be_bytes());
    // Destination options (next header UDP), then the datagram.
    let mut fragmentable = vec![17, 0, 1, 4, 0, 0, 0, 0];
    fragmentable.extend_from_slice(&udp);
    let mut frames = Vec::new();
    for (i, part) in fragmentable.chunks(chunk).enumerate() {
        let offset = i * chunk;
        let more = offset + part.len() < fragmentable.len();
        let mut f = Vec::new();
        f.extend_from_slice(&to_mac);
        f.extend_from_slice(&from_mac);
        f.extend_from_slice(&0x86ddu16.to_be_bytes());
        f.extend_from_slice(&[0x60, 0, 0, 0]);
        f.extend_from_slice(&((8 + part.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[44, 64]);
        f.extend_from_slice(&SRC);
        f.extend_from_slice(&DST);
        // Fragment header: next header Destination Options.
        f.extend_from_slice(&[60, 0]);
        f.extend_from_slice(&(((offset / 8) as u16) << 3 | u16::from(more)).to_be_bytes());
        f.extend_from_slice(&0x4242_0001u32.to_be_bytes());
        f.extend_from_slice(part);
        frames.push(f);
    }
    frames
}

#[test]
fn ipv6_fragments_with_destination_options_after_the_fragment_header_pass() {
    let (worker, client) = worker_and_client("mfw", "mfc", true);
    add_ipv6_pair(&worker, &client);
    let (worker_mac, client_mac) = (mac_of(&worker, "eth1"), mac_of(&client, "eth0"));
    let client_name = client.name.clone();
    let set = load_fixture("lab");
    in_netns(&worker.name.clone(), move || {
        let compiled = compile(&set, NODE, &["eth1".to_string()]).expect("compiles");
        let ifindex = nix::net::if_::if_nametoindex("eth1").expect("eth1");
        let mut dp = Dataplane::load().expect("loads");
        dp.attach("eth1", XdpAttachMode::Skb).expect("attaches");
        let by_index = BTreeMap::from([(ifindex, compiled.ifaces["eth1"].clone())]);
        dp.apply(&by_index, 1).expect("applies");
        let before = dp.counters().expect("counters")[direction::INGRESS as usize];
        // UDP 9999 is allowed by the lab policy.
        let socket = UdpSocket::bind("[::]:9999").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        // 3000 bytes of payload in three fragments.
        let frames = fragments(worker_mac, client_mac, 9999, 3000, 1232);
        assert_eq!(frames.len(), 3);
        for f in frames {
            send_frame(&client_name, "eth0", f);
        }
        let mut buf = vec![0u8; 8192];
        let got = socket.recv(&mut buf);
        let after = dp.counters().expect("counters")[direction::INGRESS as usize];
        let c = counter::FRAGMENT_DENIED as usize;
        let denied = after[c] - before[c];
        let events = dp.drain_events();
        assert_eq!(
            got.ok(),
            Some(3000),
            "the datagram did not arrive whole; {denied} fragments denied, events {events:?}"
        );
        assert_eq!(denied, 0, "fragment_denied");
    });
    drop((worker, client));
}
