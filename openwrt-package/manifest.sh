#!/usr/bin/env bash
# Reads ./manifest for the package builders (build-ipk.sh, build-apk.sh, the SDK
# Makefile), so the list of files and dependencies lives in one place.
#
#   manifest.sh stage BINARY DESTDIR   install every `file` line under DESTDIR
#   manifest.sh depends                the `depends` names, one a line
#   manifest.sh conffiles              the paths marked `conffile`, one a line
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)

# The manifest's records without comments and blank lines.
records() { sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$here/manifest"; }

case ${1:-} in
    stage)
        bin=${2:?binary}
        dest=${3:?destination directory}
        records | while read -r kind mode path src flag; do
            [ "$kind" = file ] || continue
            [ "$src" = @binary ] && src=$bin || src=$here/$src
            [ -f "$src" ] || { echo "manifest.sh: no file at $src" >&2; exit 2; }
            install -D -m "$mode" "$src" "$dest$path"
        done
        ;;
    depends)
        records | awk '$1 == "depends" { print $2 }'
        ;;
    conffiles)
        records | awk '$1 == "file" && $5 == "conffile" { print $3 }'
        ;;
    *)
        sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
