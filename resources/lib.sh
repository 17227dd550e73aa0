# shellcheck shell=bash
# Shared helpers for the scripts in resources/: the cache layout, fetching Debian packages with their
# SHA256 checked against the apt metadata, copying a binary with its whole ldd closure into a tree, and
# packing a tree as an initramfs (newc cpio). Sourced, never run.
#
# Everything built lands in resources/cache/ (git-ignored). Each product is rebuilt only when missing or
# when the inputs it was built from changed: a product FILE has a stamp FILE.inputs holding the digest of
# its inputs, and `fresh FILE DIGEST` says whether FILE is up to date.

RES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE=${RESOURCES_CACHE:-$RES_DIR/cache}
mkdir -p "$CACHE"

log() { echo "resources: $*" >&2; }

# lock NAME: holds an exclusive lock on cache/NAME.lock (on fd 9) until the script exits or calls
# `unlock`, so two runs at once never build the same product side by side.
lock() { exec 9>"$CACHE/$1.lock" && flock 9; }
unlock() { flock -u 9; }
die() { echo "resources: error: $*" >&2; exit 1; }

# digest WORDS...: a short SHA256 of its arguments, used as an input digest.
digest() { printf '%s\n' "$@" | sha256sum | cut -c1-16; }

# file_digest FILE...: digest of the contents of the given files (names excluded).
file_digest() { cat "$@" | sha256sum | cut -c1-16; }

# fresh FILE DIGEST: true when FILE exists and was built from inputs with this digest.
fresh() { [ -e "$1" ] && [ -f "$1.inputs" ] && [ "$(cat "$1.inputs")" = "$2" ]; }

# stamp FILE DIGEST: record that FILE was built from inputs with this digest.
stamp() { echo "$2" > "$1.inputs"; }

# apt_ready: make sure the apt metadata is there (a fresh machine may never have run apt-get update).
apt_ready() {
  if ! apt-cache show busybox-static >/dev/null 2>&1; then
    log "apt metadata missing: apt-get update"
    apt-get update -qq
  fi
}

# deb_version PKG: the candidate version of PKG in the apt metadata.
deb_version() { apt-cache policy "$1" | awk '/Candidate:/ {print $2}'; }

# fetch_deb PKG: prints the path of PKG's candidate .deb in the cache, downloading it when missing.
# The file's SHA256 must equal the one in the (signed) apt metadata for that version; every verified
# checksum is recorded in cache/debs/SHA256SUMS.
fetch_deb() {
  local pkg=$1 ver want file got
  ver=$(deb_version "$pkg")
  [ -n "$ver" ] && [ "$ver" != "(none)" ] || die "no candidate version for package $pkg"
  want=$(apt-cache show --no-all-versions "$pkg=$ver" | awk '/^SHA256:/ {print $2; exit}')
  [ -n "$want" ] || die "apt metadata has no SHA256 for $pkg=$ver"
  mkdir -p "$CACHE/debs"
  file="$CACHE/debs/${pkg}_${ver//:/%3a}_amd64.deb"
  if [ ! -f "$file" ] || [ "$(sha256sum < "$file" | cut -d' ' -f1)" != "$want" ]; then
    log "downloading $pkg $ver"
    (cd "$CACHE/debs" && rm -f "${pkg}_"*.deb && apt-get download -q "$pkg=$ver" >/dev/null 2>&1) \
      || die "apt-get download $pkg=$ver failed"
    [ -f "$file" ] || die "apt-get download $pkg=$ver did not produce $file"
  fi
  got=$(sha256sum < "$file" | cut -d' ' -f1)
  [ "$got" = "$want" ] || die "SHA256 of $file is $got, the apt metadata says $want"
  grep -q "$got" "$CACHE/debs/SHA256SUMS" 2>/dev/null || echo "$got  $(basename "$file")" >> "$CACHE/debs/SHA256SUMS"
  echo "$file"
}

# copy_with_libs ROOT FILE...: copies each executable FILE to the same path under ROOT, with every
# shared library it loads (its ldd closure, symlinks resolved) at the path the loader looks for it.
copy_with_libs() {
  local root=$1 f lib
  shift
  for f in "$@"; do
    [ -f "$f" ] || die "no such file: $f"
    install -D -m 0755 "$f" "$root$f"
    if ldd "$f" >/dev/null 2>&1; then
      # "libx.so => /path (addr)", "/lib64/ld-linux-x86-64.so.2 (addr)"; vdso has no path.
      while read -r lib; do
        [ -e "$root$lib" ] || install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
      done < <(ldd "$f" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}')
    fi
  done
}

# pack_cpio DIR OUT: packs DIR as an uncompressed newc cpio archive (root-owned). Uncompressed, because
# unpacking is far cheaper than decompressing for a kernel running under emulation, and archives can be
# concatenated.
pack_cpio() {
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$2.tmp"
  mv "$2.tmp" "$2"
}

# kernel_modules TREE KVER MODULE...: prints, in load order (dependencies first, each once), the
# modules.dep paths of the given modules and everything they depend on.
kernel_modules() {
  local tree=$1 kver=$2
  shift 2
  awk -v want="$*" '
    BEGIN { n = split(want, w, " ") }
    {
      name = $1; sub(/:$/, "", name)
      base = name; sub(/.*\//, "", base); sub(/\.ko$/, "", base); gsub(/-/, "_", base)
      path[base] = name
      deps[name] = ""
      for (i = 2; i <= NF; i++) deps[name] = deps[name] " " $i
    }
    function visit(m,   d, k, i) {
      if (m in seen) return
      seen[m] = 1
      # modules.dep lists the deepest dependency last: load from the end.
      k = split(deps[m], d, " ")
      for (i = k; i >= 1; i--) visit(d[i])
      print m
    }
    END {
      for (i = 1; i <= n; i++) {
        m = w[i]; gsub(/-/, "_", m)
        if (!(m in path)) { print "unknown module " w[i] > "/dev/stderr"; exit 1 }
        visit(path[m])
      }
    }
  ' "$tree/lib/modules/$kver/modules.dep"
}

# busybox_tree ROOT INIT KTREE KVER MODULE...: lays out a busybox system in ROOT: /bin with busybox
# and a link per applet, INIT as /init, the given kernel modules with their dependencies in
# /lib/modules, and /lib/modules/load-order listing them in the order to insmod them.
busybox_tree() {
  local root=$1 init=$2 ktree=$3 kver=$4 m applet d
  shift 4
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,usr/local/bin,dev,proc,sys,tmp,run,root,etc,lib/modules}
  install -m 0755 "$(command -v busybox)" "$root/bin/busybox"
  for applet in $(busybox --list); do
    [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
  done
  install -m 0755 "$init" "$root/init"
  : > "$root/lib/modules/load-order"
  for m in $(kernel_modules "$ktree" "$kver" "$@"); do
    install -m 0644 "$ktree/lib/modules/$kver/$m" "$root/lib/modules/$(basename "$m")"
    basename "$m" >> "$root/lib/modules/load-order"
  done
}
