#!/usr/bin/env python3
"""Writes an apk-tools 3 package (ADB format, what OpenWrt 25.12's `apk` installs)
from a staged directory tree, the way `apk mkpkg` lays it out, without apk-tools.

Why a script of our own: apk-tools 3 is in no registry our CI reaches, and the format
is small (apk-tools' doc/apk-v3.5 and src/adb.h, src/apk_adb.[ch], src/app_mkpkg.c).
Python 3 (standard library only) because the package needs nothing but SHA-256 and a
raw deflate stream, both in the standard library; a Rust tool would have added
compression and hash crates to the workspace for a build script. The test suite
reads the result with its own ADB parser (tests/tests/package.rs), and real
apk-tools installed the golden package (README, "Installing on OpenWrt").

Deterministic: no clock, owners are root, modes come from the staged tree, file
times are --mtime, the order is apk's (sorted), and zlib's level-9 deflate is fixed.

The layout (all integers little-endian):
  "ADBd" + raw-deflate( "ADB." "pckg"  ADB-block  DATA-block... )
A block is a u32 (type << 30 | 4 + payload length), the payload, zero padding to
8 bytes. The ADB block is the `adb_hdr` (compat 0, version 0, reserved, root value)
followed by the values the root refers to; a value is a u32 tag (type in the top
4 bits, an immediate integer or an offset into the block in the low 28). Each DATA
block is (path index, file index) and the bytes of one regular file, in the order
of the paths and files arrays.
"""

import argparse
import hashlib
import os
import stat
import struct
import sys
import zlib

# Value types (adb.h).
T_SPECIAL = 0x00000000
T_INT = 0x10000000
T_INT_32 = 0x20000000
T_INT_64 = 0x30000000
T_BLOB_8 = 0x80000000
T_BLOB_16 = 0x90000000
T_BLOB_32 = 0xA0000000
T_ARRAY = 0xD0000000
T_OBJECT = 0xE0000000
NULL = 0

BLOCK_ADB = 0
BLOCK_DATA = 2
SCHEMA_PACKAGE = 0x676B6370  # "pckg"

# Field indexes (apk_adb.h).
PKG_PKGINFO, PKG_PATHS, PKG_SCRIPTS = 1, 2, 3
PI = {
    "name": 1, "version": 2, "hashes": 3, "description": 4, "arch": 5,
    "license": 6, "origin": 7, "maintainer": 8, "url": 9,
    "installed-size": 12, "depends": 15,
}
ACL_MODE, ACL_USER, ACL_GROUP = 1, 2, 3
FI_NAME, FI_ACL, FI_SIZE, FI_MTIME, FI_HASHES = 1, 2, 3, 4, 5
DI_NAME, DI_ACL, DI_FILES = 1, 2, 3
DEP_NAME = 1
SCRIPTS = {
    "trigger": 1, "pre-install": 2, "post-install": 3, "pre-deinstall": 4,
    "post-deinstall": 5, "pre-upgrade": 6, "post-upgrade": 7,
}
UNIQUE_ID_LEN = 20  # mkpkg's unique id: a SHA-1-sized slice of a SHA-256


class Adb:
    """The ADB block being written: a byte buffer of values, header first."""

    def __init__(self):
        self.buf = bytearray(8)  # adb_hdr; the root value is patched in at the end

    def _put(self, data, align):
        self.buf += bytes(-len(self.buf) % align)
        offset = len(self.buf)
        if offset > 0x0FFFFFFF:
            raise ValueError("ADB block too large")
        self.buf += data
        return offset

    def blob(self, data):
        if not data:
            return NULL
        n = len(data)
        if n > 0xFFFF:
            return T_BLOB_32 | self._put(struct.pack("<I", n) + data, 4)
        if n > 0xFF:
            return T_BLOB_16 | self._put(struct.pack("<H", n) + data, 2)
        return T_BLOB_8 | self._put(struct.pack("<B", n) + data, 1)

    def int(self, n):
        if n >= 1 << 32:
            return T_INT_64 | self._put(struct.pack("<Q", n), 4)
        if n >= 0x10000000:
            return T_INT_32 | self._put(struct.pack("<I", n), 4)
        return T_INT | n

    def _slots(self, kind, values):
        # Trailing nulls are left out, as adb_w_obj does; slot 0 is the count.
        values = list(values)
        while values and values[-1] == NULL:
            values.pop()
        if not values:
            return NULL
        slots = [len(values) + 1] + values
        return kind | self._put(struct.pack("<%dI" % len(slots), *slots), 4)

    def obj(self, fields):
        """fields: {index: value}; unset indexes are null."""
        top = max(fields, default=0)
        return self._slots(T_OBJECT, [fields.get(i, NULL) for i in range(1, top + 1)])

    def arr(self, items):
        return self._slots(T_ARRAY, items)

    def finish(self, root):
        struct.pack_into("<BBHI", self.buf, 0, 0, 0, 0, root)
        return bytes(self.buf)


def block(kind, payload):
    raw = 4 + len(payload)
    if raw > 0x3FFFFFFF:
        raise ValueError("block too large for a plain block header")
    return struct.pack("<I", (kind << 30) | raw) + payload + bytes(-raw % 8)


def apk_sort_key(name):
    # apk_blob_sort: bytewise, a prefix before the longer name.
    return name.encode()


def scan(root):
    """Directories (relative, "" for the root) -> sorted [(name, full path)] of the
    files in each; every directory of the tree is listed, as mkpkg does by default."""
    dirs = {}
    for cur, subdirs, files in os.walk(root):
        rel = os.path.relpath(cur, root)
        rel = "" if rel == "." else rel
        entries = []
        for name in files:
            full = os.path.join(cur, name)
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode):
                raise SystemExit("apkpack: only regular files are supported: %s" % full)
            entries.append((name, full))
        entries.sort(key=lambda e: apk_sort_key(e[0]))
        dirs[rel] = entries
    return dirs


def build(args):
    db = Adb()
    root = args.root
    dirs = scan(root)
    acl_file = {}

    def acl(mode):
        # One ACL object per mode (apk dedups identical values the same way).
        if mode not in acl_file:
            acl_file[mode] = db.obj({
                ACL_MODE: db.int(mode),
                ACL_USER: db.blob(b"root"),
                ACL_GROUP: db.blob(b"root"),
            })
        return acl_file[mode]

    installed_size = 0
    data_blocks = []  # (path index, file index, full path)
    paths = []
    for pi, dirname in enumerate(sorted(dirs, key=apk_sort_key), start=1):
        files = []
        for fi, (name, full) in enumerate(dirs[dirname], start=1):
            st = os.lstat(full)
            with open(full, "rb") as f:
                content = f.read()
            installed_size += len(content)
            files.append(db.obj({
                FI_NAME: db.blob(name.encode()),
                FI_ACL: acl(stat.S_IMODE(st.st_mode)),
                FI_SIZE: db.int(len(content)),
                FI_MTIME: db.int(args.mtime),
                FI_HASHES: db.blob(hashlib.sha256(content).digest()),
            }))
            if content:
                data_blocks.append((pi, fi, content))
        dmode = stat.S_IMODE(os.lstat(os.path.join(root, dirname)).st_mode)
        paths.append(db.obj({
            DI_NAME: db.blob(dirname.encode()),
            DI_ACL: acl(dmode),
            DI_FILES: db.arr(files),
        }))

    deps = [db.obj({DEP_NAME: db.blob(d.encode())})
            for d in sorted(set(args.depends), key=apk_sort_key)]
    scripts = {}
    for spec in args.script:
        kind, _, path = spec.partition(":")
        if kind not in SCRIPTS:
            raise SystemExit("apkpack: unknown script type %s" % kind)
        with open(path, "rb") as f:
            scripts[SCRIPTS[kind]] = db.blob(f.read())
    # As mkpkg: a package with scripts counts at least one byte.
    installed_size = max(installed_size, 1)

    # The unique id: written as zeros, then the first 20 bytes of the SHA-256 of the
    # whole ADB block (with those zeros) are put in its place, as mkpkg does.
    uid = db.blob(bytes(UNIQUE_ID_LEN))
    uid_at = (uid & 0x0FFFFFFF) + 1
    info = {
        PI["name"]: db.blob(args.name.encode()),
        PI["version"]: db.blob(args.version.encode()),
        PI["hashes"]: uid,
        PI["description"]: db.blob(args.description.encode()),
        PI["arch"]: db.blob(args.arch.encode()),
        PI["license"]: db.blob(args.license.encode()),
        PI["origin"]: db.blob(args.origin.encode()),
        PI["maintainer"]: db.blob(args.maintainer.encode()),
        PI["installed-size"]: db.int(installed_size),
        PI["depends"]: db.arr(deps),
    }
    if args.url:
        info[PI["url"]] = db.blob(args.url.encode())
    pkg = {
        PKG_PKGINFO: db.obj(info),
        PKG_PATHS: db.arr(paths),
    }
    if scripts:
        pkg[PKG_SCRIPTS] = db.obj(scripts)
    adb = bytearray(db.finish(db.obj(pkg)))
    adb[uid_at:uid_at + UNIQUE_ID_LEN] = hashlib.sha256(adb).digest()[:UNIQUE_ID_LEN]

    out = bytearray(b"ADB." + struct.pack("<I", SCHEMA_PACKAGE))
    out += block(BLOCK_ADB, bytes(adb))
    for pi, fi, content in data_blocks:
        out += block(BLOCK_DATA, struct.pack("<II", pi, fi) + content)
    # apk's default: "ADBd" and a raw deflate stream, level 9, memLevel 8.
    z = zlib.compressobj(9, zlib.DEFLATED, -15, 8, zlib.Z_DEFAULT_STRATEGY)
    return b"ADBd" + z.compress(bytes(out)) + z.flush()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", required=True, help="staged tree: what lands on the router")
    p.add_argument("--output", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--version", required=True, help="apk form, e.g. 0.1.0-r1")
    p.add_argument("--arch", required=True)
    p.add_argument("--description", required=True)
    p.add_argument("--license", required=True)
    p.add_argument("--origin", required=True)
    p.add_argument("--maintainer", required=True)
    p.add_argument("--url", default="")
    p.add_argument("--mtime", type=int, required=True, help="file times (seconds)")
    p.add_argument("--depends", action="append", default=[])
    p.add_argument("--script", action="append", default=[], help="TYPE:FILE, e.g. post-install:x")
    args = p.parse_args()
    data = build(args)
    tmp = args.output + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, args.output)


if __name__ == "__main__":
    sys.exit(main())
