package network

import (
	"encoding/binary"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// A small vocabulary over nftables expressions, so that rules read like the
// nft lines they are (each function's comment gives the nft it stands for).
// Every rule is built from these; nothing shells out to nft.

type exprs []expr.Any

func rule(parts ...exprs) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func ifname(name string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, name)
	return b
}

// iif: iifname NAME (a trailing '*' matches a prefix).
func iif(name string) exprs { return ifMatch(expr.MetaKeyIIFNAME, name, expr.CmpOpEq) }

// oif: oifname NAME.
func oif(name string) exprs { return ifMatch(expr.MetaKeyOIFNAME, name, expr.CmpOpEq) }

// notOif: oifname != NAME.
func notOif(name string) exprs { return ifMatch(expr.MetaKeyOIFNAME, name, expr.CmpOpNeq) }

func ifMatch(key expr.MetaKey, name string, op expr.CmpOp) exprs {
	data := ifname(name)
	if n := len(name); n > 0 && name[n-1] == '*' {
		data = []byte(name[:n-1])
	}
	return exprs{
		&expr.Meta{Key: key, Register: 1},
		&expr.Cmp{Op: op, Register: 1, Data: data},
	}
}

// nfproto: meta nfproto ipv4|ipv6.
func nfproto(v6 bool) exprs {
	p := byte(unix.NFPROTO_IPV4)
	if v6 {
		p = unix.NFPROTO_IPV6
	}
	return exprs{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

// l4proto: meta l4proto tcp|udp.
func l4proto(p byte) exprs {
	return exprs{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{p}},
	}
}

func addrField(a netip.Addr, dst bool) (off, n uint32) {
	switch {
	case a.Is4() && dst:
		return 16, 4
	case a.Is4():
		return 12, 4
	case dst:
		return 24, 16
	default:
		return 8, 16
	}
}

// addrIs: ip[6] saddr|daddr ADDR (including the nfproto check).
func addrIs(a netip.Addr, dst bool, op expr.CmpOp) exprs {
	off, n := addrField(a, dst)
	return append(nfproto(a.Is6()),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
		&expr.Cmp{Op: op, Register: 1, Data: a.AsSlice()},
	)
}

// addrIn: ip[6] saddr|daddr @set (including the nfproto check).
func addrIn(set *nftables.Set, v6, dst bool) exprs {
	var probe netip.Addr
	if v6 {
		probe = netip.IPv6Unspecified()
	} else {
		probe = netip.IPv4Unspecified()
	}
	off, n := addrField(probe, dst)
	return append(nfproto(v6),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
		&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
	)
}

// inPrefix: ip[6] daddr|saddr PREFIX.
func inPrefix(p netip.Prefix, dst bool) exprs {
	p = p.Masked()
	off, n := addrField(p.Addr(), dst)
	mask := make([]byte, n)
	for i := 0; i < p.Bits(); i++ {
		mask[i/8] |= 0x80 >> (i % 8)
	}
	return append(nfproto(p.Addr().Is6()),
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: n},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: mask, Xor: make([]byte, n)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Addr().AsSlice()},
	)
}

// dport: th dport PORT (after an l4proto match).
func dport(port uint16) exprs {
	return exprs{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: be16(port)},
	}
}

// dportRange: th dport LO-HI.
func dportRange(lo, hi uint16) exprs {
	return exprs{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: be16(lo), ToData: be16(hi)},
	}
}

func be16(v uint16) []byte {
	b := make([]byte, 2)
	binary.BigEndian.PutUint16(b, v)
	return b
}

// ctState: ct state established,related.
func ctEstablished() exprs {
	return exprs{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATE},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4,
			Mask: nativeU32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED), Xor: nativeU32(0)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: nativeU32(0)},
	}
}

// ctDNAT: ct status dnat.
func ctDNAT() exprs {
	return exprs{
		&expr.Ct{Register: 1, Key: expr.CtKeySTATUS},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: nativeU32(0x20), Xor: nativeU32(0)}, // IPS_DST_NAT
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: nativeU32(0)},
	}
}

func nativeU32(v uint32) []byte {
	b := make([]byte, 4)
	binary.NativeEndian.PutUint32(b, v)
	return b
}

func accept() exprs { return exprs{&expr.Verdict{Kind: expr.VerdictAccept}} }
func drop() exprs   { return exprs{&expr.Verdict{Kind: expr.VerdictDrop}} }

// rejectTCP: reject with tcp reset.
func rejectTCP() exprs {
	return exprs{&expr.Reject{Type: unix.NFT_REJECT_TCP_RST}}
}

// rejectUDP: reject with icmpx port-unreachable — the answer a UDP socket
// turns into "connection refused" at once (gVisor's netstack, like many
// stacks, does not report administratively prohibited to UDP sockets).
func rejectUDP() exprs {
	return exprs{&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_PORT_UNREACH}}
}

// rejectAny: reject with icmpx admin-prohibited.
func rejectAny() exprs {
	return exprs{&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED}}
}

// natTo: snat|dnat ip[6] to ADDR[:PORT].
func natTo(t expr.NATType, a netip.Addr, port uint16) exprs {
	fam := uint32(unix.NFPROTO_IPV4)
	if a.Is6() {
		fam = unix.NFPROTO_IPV6
	}
	e := exprs{&expr.Immediate{Register: 1, Data: a.AsSlice()}}
	nat := &expr.NAT{Type: t, Family: fam, RegAddrMin: 1}
	if port != 0 {
		e = append(e, &expr.Immediate{Register: 2, Data: be16(port)})
		nat.RegProtoMin = 2
	}
	return append(e, nat)
}

// masquerade: masquerade.
func masquerade() exprs { return exprs{&expr.Masq{}} }

// icmp6Type: icmpv6 type TYPE (after an l4proto match).
func icmp6Type(typ byte) exprs {
	return exprs{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{typ}},
	}
}

// ctMarkIs: ct mark MARK.
func ctMarkIs(mark uint32) exprs {
	return exprs{
		&expr.Ct{Register: 1, Key: expr.CtKeyMARK},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: nativeU32(mark)},
	}
}

// ctMarkSet: ct mark set MARK.
func ctMarkSet(mark uint32) exprs {
	return exprs{
		&expr.Immediate{Register: 1, Data: nativeU32(mark)},
		&expr.Ct{Register: 1, Key: expr.CtKeyMARK, SourceRegister: true},
	}
}

// tcpRST: tcp flags & rst != 0 (after an l4proto tcp match).
func tcpRST() exprs {
	return exprs{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0x04}, Xor: []byte{0}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0}},
	}
}
