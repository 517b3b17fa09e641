//! moat's kernel programs: XDP on ingress, TC (clsact egress) on egress.
//!
//! Both are thin: they hand the frame to `judge::judge` and turn its verdict
//! into the hook's return code. There is no error path that fails open.
#![no_std]
#![no_main]

mod conntrack;
mod judge;
mod maps;
mod packet;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_SHOT, TC_ACT_UNSPEC},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use moat_common::{direction, verdict};

/// Bytes of an egress packet that must be in the linear part of the skb for
/// direct access: enough for VLAN tags, IPv6 extension headers and an ICMP
/// error's quoted headers.
const EGRESS_HEADER_BYTES: u32 = 256;

#[xdp]
pub fn moat_ingress(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u32;
    let ifindex = ctx.ingress_ifindex() as u32;
    // A tag the NIC took off (rx VLAN offload) is not in the data and XDP
    // cannot see it; the stack still strips the rest as parsed here.
    match judge::judge(
        ctx.ctx.cast(),
        ctx.data(),
        ctx.data_end(),
        ifindex,
        direction::INGRESS,
        len,
        0,
    ) {
        verdict::ALLOW => xdp_action::XDP_PASS,
        _ => xdp_action::XDP_DROP,
    }
}

#[classifier]
pub fn moat_egress(ctx: TcContext) -> i32 {
    let len = ctx.len();
    let want = if len < EGRESS_HEADER_BYTES {
        len
    } else {
        EGRESS_HEADER_BYTES
    };
    if ((ctx.data_end() - ctx.data()) as u32) < want {
        // A failed pull leaves the headers partly outside the linear area;
        // the parser then sees a short packet and denies it: closed.
        let _ = ctx.pull_data(want);
    }
    // SAFETY: reading fields of the __sk_buff context the kernel gave us.
    let (ifindex, vlan_present) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).vlan_present) };
    // A tag a VLAN device left for the NIC to insert (tx offload) sits in
    // skb->vlan_tci, outside the data: it counts towards the bound.
    let outer_tags = u32::from(vlan_present != 0);
    match judge::judge(
        ctx.skb.skb.cast(),
        ctx.data(),
        ctx.data_end(),
        ifindex,
        direction::EGRESS,
        len,
        outer_tags,
    ) {
        // UNSPEC: let any program after ours (TCX chain) have its say.
        verdict::ALLOW => TC_ACT_UNSPEC,
        _ => TC_ACT_SHOT,
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
