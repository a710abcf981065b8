#!/usr/bin/env bash
# Assembles an installable OpenWrt .ipk from a built netpilot-agent binary, without
# the SDK: an outer gzip tar holding ./debian-binary, ./data.tar.gz and
# ./control.tar.gz, as opkg expects. Reproducible: fixed owners, order and mtime.
#
# usage: build-ipk.sh BINARY OPENWRT_ARCH OUTDIR [VERSION]
#   OPENWRT_ARCH: x86_64 | aarch64_cortex-a53 | arm_cortex-a7_neon-vfpv4 | mipsel_24kc | mips_24kc
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bin=${1:?binary}
arch=${2:?openwrt arch}
out=${3:?output directory}
version=${4:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -n1)-1}

case "$arch" in
    x86_64|aarch64_cortex-a53|arm_cortex-a7_neon-vfpv4|mipsel_24kc|mips_24kc) ;;
    *) echo "build-ipk.sh: unknown OpenWrt arch $arch" >&2; exit 2 ;;
esac
[ -f "$bin" ] || { echo "build-ipk.sh: no binary at $bin" >&2; exit 2; }

mtime=${SOURCE_DATE_EPOCH:-$(git -C "$here" log -1 --format=%ct 2>/dev/null || echo 0)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# data: what lands on the router.
data="$work/data"
install -D -m 0755 "$bin" "$data/usr/sbin/netpilot-agent"
install -D -m 0755 "$here/files/netpilot.init" "$data/etc/init.d/netpilot"
install -D -m 0644 "$here/files/netpilot.config" "$data/etc/config/netpilot"
install -D -m 0644 "$here/files/keep.d" "$data/lib/upgrade/keep.d/netpilot"
install -D -m 0755 "$here/files/netpilot-boot.init" "$data/etc/init.d/netpilot-boot"
install -D -m 0644 "$here/files/netpilot.hotplug" "$data/etc/hotplug.d/iface/90-netpilot"
install -D -m 0644 "$here/files/fw4-include.nft" "$data/usr/share/nftables.d/ruleset-post/netpilot.nft"

# Installed-Size in bytes, as OpenWrt's own ipkg-build writes it.
installed_size=$(find "$data" -type f -printf '%s\n' | awk '{s += $1} END {print s}')

ctrl="$work/control"
mkdir -p "$ctrl"
cat > "$ctrl/control" <<CONTROL
Package: netpilot-agent
Version: $version
Depends: nftables, tc, kmod-sched-core, kmod-nft-core
Source: netpilot
SourceName: netpilot-agent
License: Apache-2.0
Section: net
Architecture: $arch
Installed-Size: $installed_size
Maintainer: NetPilot <dev@netpilot.invalid>
Description: NetPilot agent: cloud management of this router.
 Dials out over TLS to a NetPilot relay and serves the router API over that
 connection, enforcing policy with nftables, tc and dnsmasq.
CONTROL
install -m 0644 "$here/files/conffiles" "$ctrl/conffiles"
install -m 0755 "$here/files/postinst" "$ctrl/postinst"
install -m 0755 "$here/files/prerm" "$ctrl/prerm"

pack() { # dir archive
    (cd "$1" && tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$mtime" \
        -cf - .) | gzip -n -9 > "$2"
}
pack "$data" "$work/data.tar.gz"
pack "$ctrl" "$work/control.tar.gz"
printf '2.0\n' > "$work/debian-binary"

mkdir -p "$out"
ipk="$out/netpilot-agent_${version}_${arch}.ipk"
(cd "$work" && tar --owner=0 --group=0 --numeric-owner --mtime="@$mtime" \
    -cf - ./debian-binary ./data.tar.gz ./control.tar.gz) | gzip -n -9 > "$ipk"
echo "$ipk"
