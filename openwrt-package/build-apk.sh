#!/usr/bin/env bash
# Assembles an installable OpenWrt 25.12 .apk (apk-tools 3, ADB format) from a built
# netpilot-agent binary, without the SDK or apk-tools: the files of ./manifest (the
# same as the .ipk's), the maintainer scripts OpenWrt's apk packages carry, and the
# lib/apk/packages/ lists OpenWrt's own apk packages carry. apkpack.py writes the
# ADB container. Reproducible: fixed owners, order and mtime.
#
# usage: build-apk.sh BINARY OPENWRT_ARCH OUTDIR [VERSION]
#   OPENWRT_ARCH: x86_64 | aarch64_cortex-a53 | arm_cortex-a7_neon-vfpv4 | mipsel_24kc | mips_24kc
#   VERSION: apk form, default <workspace version>-r1 (the .ipk's 0.1.0-1 is 0.1.0-r1)
# Writes OUTDIR/netpilot-agent-VERSION.apk (OpenWrt's apk file name has no arch; use
# one OUTDIR per arch) and prints its path.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bin=${1:?binary}
arch=${2:?openwrt arch}
out=${3:?output directory}
version=${4:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -n1)-r1}
name=netpilot-agent

case "$arch" in
    x86_64|aarch64_cortex-a53|arm_cortex-a7_neon-vfpv4|mipsel_24kc|mips_24kc) ;;
    *) echo "build-apk.sh: unknown OpenWrt arch $arch" >&2; exit 2 ;;
esac
[ -f "$bin" ] || { echo "build-apk.sh: no binary at $bin" >&2; exit 2; }

mtime=${SOURCE_DATE_EPOCH:-$(git -C "$here" log -1 --format=%ct 2>/dev/null || echo 0)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 022

# data: what lands on the router, as listed in ./manifest.
data="$work/data"
"$here/manifest.sh" stage "$bin" "$data"

# OpenWrt's apk packages list their files, conffiles and the conffiles' pristine
# checksums here (package-pack.mk); default_postinst/default_prerm and sysupgrade
# (which keeps changed conffiles) read them. The .list names every file but these.
meta="$data/lib/apk/packages"
mkdir -p "$meta"
(cd "$data" && find . -type f -printf '/%P\n' | LC_ALL=C sort) > "$work/list"
mv "$work/list" "$meta/$name.list"
"$here/manifest.sh" conffiles > "$meta/$name.conffiles"
while read -r f; do
    printf '%s %s\n' "$f" "$(sha256sum < "$data$f" | cut -d' ' -f1)"
done < "$meta/$name.conffiles" > "$meta/$name.conffiles_static"
chmod 0644 "$meta"/*

# Maintainer scripts, the ipk's postinst and prerm, named as OpenWrt's apk packages
# name them: apk runs post-install on a fresh install, post-upgrade (not
# post-install) on an upgrade, pre-deinstall before a removal.
scripts="$work/scripts"
mkdir -p "$scripts"
cp "$here/files/postinst" "$scripts/post-install"
{
    echo '#!/bin/sh'
    echo 'export PKG_UPGRADE=1'
    sed '/^[[:space:]]*#!/d' "$here/files/postinst"
} > "$scripts/post-upgrade"
cp "$here/files/prerm" "$scripts/pre-deinstall"

deps=()
while read -r d; do deps+=(--depends "$d"); done < <("$here/manifest.sh" depends)

mkdir -p "$out"
apk="$out/$name-$version.apk"
python3 "$here/apkpack.py" --root "$data" --output "$apk" \
    --name "$name" --version "$version" --arch "$arch" \
    --description "NetPilot agent: cloud management of this router. Dials out over TLS to a NetPilot relay and serves the router API over that connection, enforcing policy with nftables, tc and dnsmasq." \
    --license Apache-2.0 --origin netpilot --maintainer "NetPilot <dev@netpilot.invalid>" \
    --mtime "$mtime" "${deps[@]}" \
    --script "post-install:$scripts/post-install" \
    --script "post-upgrade:$scripts/post-upgrade" \
    --script "pre-deinstall:$scripts/pre-deinstall"
echo "$apk"
