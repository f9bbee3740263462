#!/usr/bin/env bash
# Provision the arm64 guest stack of the restricted-DMA-pool tests (issue 17), next to the
# x86 one (scripts/provision.sh) in the same cache, under $APERTURE_CACHE/arm64:
#   1. host tools: the cross compiler, kernel build tools, device-tree-compiler (apt-get);
#   2. versions, by the policy of scripts/versions.env, read from the suites' package
#      indexes through a private apt state (the host's apt sources are not touched):
#      qemu-system-arm of the version scripts/resolve.sh picks for the x86 QEMU (same
#      series, same build), and $APERTURE_ARM64_KERNEL_SOURCE (linux-source-6.12) of the
#      version of the resolved x86 guest kernel (else the newest of the suite, warned);
#   3. busybox-static for arm64: the host suite's .deb, downloaded and unpacked;
#   4. a trixie minbase tree with qemu-system-arm from trixie-backports, run through
#      the tree's own dynamic loader by bin/qemu-system-aarch64 (as for x86); it must
#      list vfio-user-pci;
#   5. the guest kernel: Debian's kernel source, `make ARCH=arm64 allnoconfig` with
#      scripts/guest/arm64-pool.config as KCONFIG_ALLCONFIG, every line of which is
#      checked in the resulting .config, then `make Image`, with progress lines. Built
#      once per (source version, fragment hash, cross-gcc version); the object tree and
#      the unpacked source are deleted after a successful build (the source .deb is
#      kept) unless APERTURE_ARM64_KEEP_BUILD=1;
#   6. a smoke boot (virt, TCG) of the kernel with a busybox initramfs, once per key;
#   7. KEY=VALUE lines on stdout, also in $APERTURE_CACHE/arm64/env.
# Safe to re-run; a second run takes about 2.5 s (from empty: about 4 min on 2 CPUs). Needs root (apt-get, debootstrap).
# Every failure says what could not be provisioned.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
usage: $0 [--refresh-qemu] [--refresh-kernel] [--refresh]
  --refresh-qemu    rebuild the aarch64 QEMU tree
  --refresh-kernel  rebuild the arm64 guest kernel (re-uses the cached source)
  --refresh         both
env: APERTURE_CACHE, APERTURE_APT_MIRROR, any variable of scripts/versions.env,
     APERTURE_ARM64_KEEP_BUILD=1 (keep the kernel's object tree and unpacked source),
     APERTURE_ARM64_JOBS
     (make -j; default: number of CPUs)
EOF
}

provision_args "$@"

CACHE="$APERTURE_CACHE/arm64"
mkdir -p "$CACHE"/{bin,debs,logs,tools,qemu,apt,src,kernel}
# Its own lock: a kernel build of minutes must not hold up the x86 provisioning.
exec {lock_fd}>"$CACHE/.lock"
if ! flock -n "$lock_fd"; then
    log "waiting for another arm64 provisioning run holding $CACHE/.lock"
    flock "$lock_fd"
fi
log "cache: $CACHE"
case "$APERTURE_ARM64_CONFIG_FRAGMENT" in
    /*) FRAGMENT="$APERTURE_ARM64_CONFIG_FRAGMENT" ;;
    *) FRAGMENT="$APERTURE_SCRIPTS_DIR/$APERTURE_ARM64_CONFIG_FRAGMENT" ;;
esac
[[ -r "$FRAGMENT" ]] || die "config fragment $FRAGMENT is missing (APERTURE_ARM64_CONFIG_FRAGMENT)"

MIRROR="$(apt_mirror)" || die "could not determine a Debian mirror from /etc/apt/sources.list{,.d/*.sources,.d/*.list}; set APERTURE_APT_MIRROR"
HOST_SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
[[ -n "$HOST_SUITE" ]] || die "cannot tell the host's Debian suite (no VERSION_CODENAME in /etc/os-release)"
log "Debian mirror (from this machine's apt sources): $MIRROR; host suite $HOST_SUITE"

build_dirs "arm64 provisioning"

# ---------------------------------------------------------------------------------------
# 1. Host packages
# ---------------------------------------------------------------------------------------
missing=()
for p in $APERTURE_HOST_PACKAGES $APERTURE_ARM64_HOST_PACKAGES; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
    log "apt-get update (host)"
    apt-get update -q >"$CACHE/logs/host-apt-update.log" 2>&1 \
        || { tail -n 20 "$CACHE/logs/host-apt-update.log" >&2; die "host 'apt-get update' failed (log: $CACHE/logs/host-apt-update.log)"; }
    log "installing host packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        >"$CACHE/logs/host-apt-install.log" 2>&1 \
        || { tail -n 20 "$CACHE/logs/host-apt-install.log" >&2; die "could not install host packages: ${missing[*]} (log: $CACHE/logs/host-apt-install.log)"; }
else
    log "host packages present: $APERTURE_ARM64_HOST_PACKAGES"
fi
for tool in debootstrap chroot aarch64-linux-gnu-gcc readelf make flex bison bc dtc xz cpio gzip dpkg-deb flock; do
    command -v "$tool" >/dev/null || die "host tool '$tool' is missing after installing host packages ($APERTURE_ARM64_HOST_PACKAGES)"
done
[[ -r "$DEBIAN_KEYRING" ]] || die "Debian archive keyring $DEBIAN_KEYRING is missing (package debian-archive-keyring)"

# ---------------------------------------------------------------------------------------
# 2. Versions
# ---------------------------------------------------------------------------------------
# shellcheck source=resolve.sh
. "$APERTURE_SCRIPTS_DIR/resolve.sh"
# Private apt state: the QEMU backports suite and the kernel suite for amd64 (arch-all
# linux-source included), the host's suite for arm64 (busybox-static:arm64).
A="$CACHE/apt"
mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/sources.list.d" "$A/conf.d"
{
    printf 'deb [signed-by=%s arch=amd64] %s %s main\n' \
        "$DEBIAN_KEYRING" "$MIRROR" "$APERTURE_QEMU_BACKPORTS_SUITE" \
        "$DEBIAN_KEYRING" "$MIRROR" "$APERTURE_KERNEL_SUITE" | sort -u
    printf 'deb [signed-by=%s arch=arm64] %s %s main\n' "$DEBIAN_KEYRING" "$MIRROR" "$HOST_SUITE"
} >"$A/sources.list"
papt() {
    "$@" -o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts="$A/sources.list.d" \
         -o Dir::Etc::Parts="$A/conf.d" -o Dir::Etc::Preferences=/dev/null -o Dir::Etc::PreferencesParts="$A/conf.d" \
         -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache" -o Dir::State::Status=/var/lib/dpkg/status \
         -o APT::Architecture=amd64 -o APT::Architectures::=amd64 -o APT::Architectures::=arm64 \
         -o APT::Sandbox::User=root -o Acquire::Languages=none \
         -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
}
suite_index() {   # suite_index SUITE ARCH: the suite's Packages index for ARCH, decompressed
    local f
    while IFS= read -r f; do
        [[ -r "$f" ]] && /usr/lib/apt/apt-helper cat-file "$f"
    done < <(papt apt-get indextargets --format '$(FILENAME)' 'Identifier: Packages' "Release: $1" "Architecture: $2")
}

log "versions: reading $APERTURE_QEMU_BACKPORTS_SUITE, $APERTURE_KERNEL_SUITE and $HOST_SUITE/arm64 (private apt state in $A)"
papt apt-get -q --error-on=any update >"$CACHE/logs/resolve-apt.log" 2>&1 \
    || { tail -n 5 "$CACHE/logs/resolve-apt.log" >&2; die "could not read the package indexes from $MIRROR (log: $CACHE/logs/resolve-apt.log)"; }
qindex=$(suite_index "$APERTURE_QEMU_BACKPORTS_SUITE" amd64)
QEMU_DEB=$(resolve_qemu "$APERTURE_QEMU_BACKPORTS_SUITE" "$APERTURE_QEMU_SERIES" \
    "$APERTURE_QEMU_MIN_VERSION" "$APERTURE_QEMU_DEB_VERSION" <<<"$qindex") \
    || die "could not provision the aarch64 QEMU: no build in the archive fits the policy of scripts/versions.env (above)"
index_versions '^qemu-system-arm$' <<<"$qindex" | grep -qxF "qemu-system-arm $QEMU_DEB" \
    || die "could not provision the aarch64 QEMU: $APERTURE_QEMU_BACKPORTS_SUITE has qemu-system-x86 $QEMU_DEB but no qemu-system-arm of that version (it has: $(index_versions '^qemu-system-arm$' <<<"$qindex" | awk '{ print $2 }' | paste -sd' ' -))"
log "QEMU: qemu-system-arm $QEMU_DEB (the version picked for qemu-system-x86)"

kindex=$(suite_index "$APERTURE_KERNEL_SUITE" amd64)
kpick=$(resolve_kernel "$APERTURE_KERNEL_SUITE" "$APERTURE_KERNEL_SERIES" "$APERTURE_KERNEL_FLAVOUR" \
    "$APERTURE_KERNEL_PACKAGE" <<<"$kindex") \
    || die "could not provision the arm64 guest kernel: the x86 guest kernel policy resolves to nothing (above)"
read -r _ X86_KVER _ <<<"$kpick"
SRC_PKG="$APERTURE_ARM64_KERNEL_SOURCE"
src_versions=$(index_versions "^${SRC_PKG//./[.]}\$" <<<"$kindex" | awk '{ print $2 }')
[[ -n "$src_versions" ]] || die "could not provision the arm64 guest kernel: $APERTURE_KERNEL_SUITE has no $SRC_PKG (APERTURE_ARM64_KERNEL_SOURCE / APERTURE_KERNEL_SERIES in scripts/versions.env)"
if grep -qxF "$X86_KVER" <<<"$src_versions"; then
    SRC_VER="$X86_KVER"
    log "kernel source: $SRC_PKG $SRC_VER, the version of the x86 guest kernel"
else
    SRC_VER=$(index_versions "^${SRC_PKG//./[.]}\$" <<<"$kindex" | newest_of | awk '{ print $2 }')
    warn "kernel source: $APERTURE_KERNEL_SUITE has no $SRC_PKG $X86_KVER (the x86 guest kernel's version); using the newest, $SRC_VER"
fi
up=$(upstream_of "$SRC_VER")
in_series "$up" "$APERTURE_KERNEL_SERIES" || die "could not provision the arm64 guest kernel: $SRC_PKG $SRC_VER is not of series $APERTURE_KERNEL_SERIES"
kernel_refused "$up" && die "could not provision the arm64 guest kernel: $up is in a known-bad range (6.15.x, 6.16.0-6.16.3)"

# ---------------------------------------------------------------------------------------
# 3. busybox-static for arm64
# ---------------------------------------------------------------------------------------
BUSYBOX="$CACHE/tools/busybox"
# elf_machine FILE: e_machine of an ELF file (183 = AArch64).
elf_machine() { [[ "$(od -An -c -N4 "$1" 2>/dev/null | tr -d ' ')" == '177ELF' ]] && od -An -tu2 -j18 -N2 "$1" | tr -d ' '; }
if [[ -s "$CACHE/tools/busybox.version" && "$(elf_machine "$BUSYBOX")" == 183 ]]; then
    log "busybox (arm64): cached ($(cat "$CACHE/tools/busybox.version"))"
else
    log "busybox (arm64): downloading $APERTURE_BUSYBOX_PACKAGE:arm64 from $HOST_SUITE"
    new_tmp T .build-busybox
    ( cd "$T" && papt apt-get -q download "$APERTURE_BUSYBOX_PACKAGE:arm64" ) >"$CACHE/logs/busybox.log" 2>&1 \
        || { tail -n 20 "$CACHE/logs/busybox.log" >&2; die "could not provision busybox: download of $APERTURE_BUSYBOX_PACKAGE:arm64 failed (log: $CACHE/logs/busybox.log)"; }
    deb=$(echo "$T"/*.deb)
    dpkg-deb -x "$deb" "$T/x"
    [[ -s "$T/x/bin/busybox" ]] || die "could not provision busybox: $deb has no bin/busybox"
    [[ "$(elf_machine "$T/x/bin/busybox")" == 183 ]] || die "could not provision busybox: bin/busybox of $deb is not an AArch64 ELF"
    # A static binary has no program interpreter.
    ! readelf -l "$T/x/bin/busybox" | grep -q 'program interpreter' || die "could not provision busybox: bin/busybox of $deb is not static"
    dpkg-deb -f "$deb" Version >"$T/version"
    mv -f "$T/x/bin/busybox" "$BUSYBOX.new" && mv -f "$BUSYBOX.new" "$BUSYBOX"
    mv -f "$T/version" "$CACHE/tools/busybox.version"
    log "busybox (arm64): $(cat "$CACHE/tools/busybox.version") -> $BUSYBOX"
fi

# ---------------------------------------------------------------------------------------
# 4. QEMU for aarch64
# ---------------------------------------------------------------------------------------
QEMU_WRAPPER="$CACHE/bin/qemu-system-aarch64"
qemu_tag=$(printf 'arm_%s_%s_%s' "$APERTURE_QEMU_SUITE" "$APERTURE_QEMU_BACKPORTS_SUITE" "$QEMU_DEB" | tr -c 'A-Za-z0-9.+_\n-' '_')
QDIR="$CACHE/qemu/$qemu_tag"

write_wrapper() {   # write_wrapper ROOT OUTFILE
    local root="$1" out="$2"
    cat >"$out.tmp" <<EOF
#!/bin/sh
# Generated by aperture scripts/provision-arm64.sh — do not edit; re-run it instead.
# qemu-system-aarch64 of qemu-system-arm $QEMU_DEB ($APERTURE_QEMU_BACKPORTS_SUITE) from
# the Debian tree below, run through that tree's own dynamic loader (no chroot).
R='$root'
export QEMU_MODULE_DIR="\$R/usr/lib/x86_64-linux-gnu/qemu"
exec "\$R/usr/lib64/ld-linux-x86-64.so.2" --inhibit-cache \\
    --library-path "\$R/usr/lib/x86_64-linux-gnu" --argv0 qemu-system-aarch64 \\
    "\$R/usr/bin/qemu-system-aarch64" -L "\$R/usr/share/qemu" "\$@"
EOF
    chmod 0755 "$out.tmp"
    mv -f "$out.tmp" "$out"
}
check_qemu() {   # check_qemu WRAPPER: prints the version; fails naming what is missing
    local w="$1" out ver
    out=$("$w" --version 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
    ver=$(printf '%s\n' "$out" | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | head -n1)
    [[ -n "$ver" ]] || { printf 'unexpected --version output: %s\n' "$out" >&2; return 1; }
    version_ge "$ver" "$APERTURE_QEMU_MIN_VERSION" || { printf 'QEMU %s is older than %s\n' "$ver" "$APERTURE_QEMU_MIN_VERSION" >&2; return 1; }
    "$w" -machine virt -device vfio-user-pci,help >/dev/null 2>&1 \
        || { printf 'qemu-system-aarch64 %s has no usable -device vfio-user-pci\n' "$ver" >&2; return 1; }
    "$w" -machine help 2>/dev/null | grep -q '^virt ' \
        || { printf 'qemu-system-aarch64 %s has no virt machine\n' "$ver" >&2; return 1; }
    printf '%s\n' "$ver"
}

qemu_ok=0
if ((!REFRESH_QEMU)) && [[ -f "$QDIR/.complete" ]]; then
    write_wrapper "$QDIR/root" "$QEMU_WRAPPER"
    if QEMU_VERSION=$(check_qemu "$QEMU_WRAPPER"); then
        qemu_ok=1
        log "QEMU: cached tree $QDIR (QEMU $QEMU_VERSION)"
    else
        warn "cached aarch64 QEMU tree $QDIR does not work; rebuilding it"
    fi
fi
if ((!qemu_ok)); then
    new_tmp B .build-qemu
    R="$B/root"
    log "QEMU: debootstrap --variant=minbase $APERTURE_QEMU_SUITE (about 30-60 s; log: $CACHE/logs/debootstrap.log)"
    debootstrap --variant=minbase --components=main --keyring="$DEBIAN_KEYRING" \
        "$APERTURE_QEMU_SUITE" "$R" "$MIRROR" >"$CACHE/logs/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE/logs/debootstrap.log" >&2; die "could not provision the aarch64 QEMU tree: debootstrap $APERTURE_QEMU_SUITE from $MIRROR failed"; }
    log "QEMU: base tree done at $(elapsed) ($(du -sm "$R" | cut -f1) MB)"
    echo "deb $MIRROR $APERTURE_QEMU_BACKPORTS_SUITE main" >"$R/etc/apt/sources.list.d/aperture-backports.list"
    rm -f "$R/etc/resolv.conf"; cp -L /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
    printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"; chmod 0755 "$R/usr/sbin/policy-rc.d"
    mount -t proc proc "$R/proc"
    in_tree() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
                    DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
    log "QEMU: apt-get update in tree ($APERTURE_QEMU_SUITE + $APERTURE_QEMU_BACKPORTS_SUITE)"
    in_tree apt-get -q --error-on=any -o Acquire::Languages=none update >"$CACHE/logs/qemu-apt.log" 2>&1 \
        || { tail -n 20 "$CACHE/logs/qemu-apt.log" >&2; die "could not provision the aarch64 QEMU: apt-get update in the $APERTURE_QEMU_SUITE tree failed"; }
    log "QEMU: installing qemu-system-arm=$QEMU_DEB (-t $APERTURE_QEMU_BACKPORTS_SUITE)"
    in_tree apt-get install -y -q --no-install-recommends -t "$APERTURE_QEMU_BACKPORTS_SUITE" \
        "qemu-system-arm=$QEMU_DEB" >>"$CACHE/logs/qemu-apt.log" 2>&1 \
        || { tail -n 30 "$CACHE/logs/qemu-apt.log" >&2; die "could not provision the aarch64 QEMU: apt-get install qemu-system-arm=$QEMU_DEB failed in the tree (log: $CACHE/logs/qemu-apt.log)"; }
    in_tree dpkg-query -W -f='${Package} ${Version}\n' 'qemu-*' 'libc6' >"$B/packages.txt" 2>/dev/null || true
    in_tree apt-get clean
    umount "$R/proc"
    rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/usr/share/doc/* "$R"/usr/share/man/* \
           "$R"/usr/share/info/* "$R"/usr/share/locale/* "$R"/var/log/*.log "$R"/var/log/apt/*
    while IFS= read -r link; do
        target=$(readlink "$link")
        [[ "$target" == /* ]] || continue
        ln -sfn "$(realpath -s -m --relative-to="$(dirname "$link")" "$R$target")" "$link"
    done < <(find "$R/usr/share/qemu" -type l 2>/dev/null)
    [[ -x "$R/usr/bin/qemu-system-aarch64" ]] || die "could not provision the aarch64 QEMU: tree has no usr/bin/qemu-system-aarch64"
    write_wrapper "$R" "$B/wrapper-check"
    QEMU_VERSION=$(check_qemu "$B/wrapper-check") || die "could not provision the aarch64 QEMU: qemu-system-arm $QEMU_DEB fails its check (above)"
    rm -f "$B/wrapper-check"
    printf 'qemu_version=%s\ndeb_version=%s\nbuilt=%s\n' "$QEMU_VERSION" "$QEMU_DEB" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$B/.complete"
    if [[ -e "$QDIR" ]]; then OLD=$(mktemp -u "$CACHE/.old-qemu.XXXXXX"); mv "$QDIR" "$OLD"; else OLD=; fi
    mv "$B" "$QDIR"
    write_wrapper "$QDIR/root" "$QEMU_WRAPPER"
    if [[ -n "$OLD" ]]; then safe_rm_tree "$OLD"; fi
    QEMU_VERSION=$(check_qemu "$QEMU_WRAPPER") || die "could not provision the aarch64 QEMU: wrapper $QEMU_WRAPPER does not work after installing the tree"
    log "QEMU: $QEMU_VERSION ready at $(elapsed) (tree $(du -sm "$QDIR" | cut -f1) MB)"
fi
for d in "$CACHE"/qemu/*; do
    [[ "$d" == "$QDIR" ]] && continue
    log "QEMU: removing the tree of other versions: $d"
    safe_rm_tree "$d"
done

# ---------------------------------------------------------------------------------------
# 5. The guest kernel
# ---------------------------------------------------------------------------------------
CROSS=aarch64-linux-gnu-
GCC_VER=$("${CROSS}gcc" -dumpfullversion 2>/dev/null || "${CROSS}gcc" -dumpversion)
FRAG_HASH=$(sha256sum "$FRAGMENT" | cut -c1-16)
KEY=$(printf '%s\n' "$SRC_PKG=$SRC_VER" "fragment=$FRAG_HASH" "gcc=$GCC_VER" | sha256sum | cut -c1-16)
KDIR="$CACHE/kernel/$KEY"
SRC_DEB="$CACHE/debs/${SRC_PKG}_${SRC_VER//:/%3a}_all.deb"
SRC_DIR="$CACHE/src/${SRC_PKG}_$SRC_VER"

# check_config CONFIG: every line of the fragment holds in CONFIG; names each that does not.
check_config() {
    local config="$1" line sym want got bad=()  # bad: the lines that do not hold
    while IFS= read -r line; do
        if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
            sym=${BASH_REMATCH[1]} want=${BASH_REMATCH[2]}
        elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
            sym=${BASH_REMATCH[1]} want=n
        else
            continue
        fi
        got=$(sed -n "s/^$sym=//p" "$config")
        [[ -n "$got" ]] || got=n
        [[ "$got" == "$want" ]] || bad+=("$sym=$got (want $want)")
    done <"$FRAGMENT"
    ((${#bad[@]} == 0)) || { printf '%s\n' "${bad[@]}"; return 1; }
}

if ((!REFRESH_KERNEL)) && [[ -f "$KDIR/.complete" && -s "$KDIR/Image" ]] && check_config "$KDIR/config" >/dev/null; then
    log "kernel: cached $KDIR ($SRC_PKG $SRC_VER, fragment $FRAG_HASH, gcc $GCC_VER)"
else
    if ! [[ -f "$SRC_DIR/.complete" ]]; then
        if ! { [[ -s "$SRC_DEB" ]] && dpkg-deb -f "$SRC_DEB" Version >/dev/null 2>&1; }; then
            log "kernel source: downloading $SRC_PKG=$SRC_VER (about 140 MB)"
            new_tmp T .build-srcdeb
            ( cd "$T" && papt apt-get -q download "$SRC_PKG=$SRC_VER" ) >"$CACHE/logs/source-apt.log" 2>&1 \
                || { tail -n 20 "$CACHE/logs/source-apt.log" >&2; die "could not provision the arm64 guest kernel: download of $SRC_PKG=$SRC_VER failed (log: $CACHE/logs/source-apt.log)"; }
            mv -f "$T"/*.deb "$SRC_DEB"
        fi
        log "kernel source: unpacking $(basename "$SRC_DEB") (about 1.5 GB)"
        new_tmp T .build-src
        dpkg-deb -x "$SRC_DEB" "$T/x"
        tarball=$(find "$T/x/usr/src" -maxdepth 1 -name "$SRC_PKG.tar.*" | head -n1)
        [[ -n "$tarball" ]] || die "could not provision the arm64 guest kernel: $SRC_DEB has no usr/src/$SRC_PKG.tar.*"
        tar -C "$T" -xf "$tarball" || die "could not provision the arm64 guest kernel: unpacking $tarball failed"
        [[ -f "$T/$SRC_PKG/Makefile" ]] || die "could not provision the arm64 guest kernel: $tarball has no $SRC_PKG/Makefile"
        echo "$SRC_PKG=$SRC_VER" >"$T/$SRC_PKG/.complete"
        rm -rf "$SRC_DIR"
        mv "$T/$SRC_PKG" "$SRC_DIR"
        for d in "$CACHE"/src/*; do [[ "$d" == "$SRC_DIR" ]] || { log "kernel source: removing $d (other version)"; rm -rf "$d"; }; done
        for d in "$CACHE"/debs/"${SRC_PKG}"_*.deb; do [[ "$d" == "$SRC_DEB" ]] || rm -f "$d"; done
        log "kernel source: $SRC_DIR ready at $(elapsed)"
    fi
    JOBS="${APERTURE_ARM64_JOBS:-$(nproc)}"
    BUILD="$CACHE/kbuild/$KEY"
    mkdir -p "$BUILD"
    kmake() { make -C "$SRC_DIR" O="$BUILD" ARCH=arm64 CROSS_COMPILE="$CROSS" \
                   KBUILD_BUILD_USER=aperture KBUILD_BUILD_HOST=aperture "$@"; }
    KLOG="$CACHE/logs/kernel-build.log"
    log "kernel: allnoconfig + $(basename "$FRAGMENT") (log: $KLOG)"
    kmake KCONFIG_ALLCONFIG="$FRAGMENT" allnoconfig >"$KLOG" 2>&1 \
        || { tail -n 20 "$KLOG" >&2; die "could not provision the arm64 guest kernel: make allnoconfig with $FRAGMENT failed (log: $KLOG)"; }
    if ! notheld=$(check_config "$BUILD/.config"); then
        sed 's/^/  /' <<<"$notheld" >&2
        rm -rf "$BUILD"
        die "could not provision the arm64 guest kernel: these lines of $FRAGMENT do not hold after allnoconfig (a missing dependency or a wrong symbol name): $(paste -sd' ' - <<<"$notheld")"
    fi
    log "kernel: building Image with make -j$JOBS (about 3-6 min on 2 CPUs; progress every 30 s)"
    t_build=$(date +%s)
    kmake -j"$JOBS" Image >>"$KLOG" 2>&1 &
    mpid=$!
    while kill -0 "$mpid" 2>/dev/null; do
        for ((i = 0; i < 30; i++)); do kill -0 "$mpid" 2>/dev/null || break; sleep 1; done
        kill -0 "$mpid" 2>/dev/null || break
        log "kernel: $(( $(date +%s) - t_build ))s, $(grep -c '^  CC ' "$KLOG") C files compiled; last: $(grep -E '^  [A-Z]+ ' "$KLOG" | tail -n1 | sed 's/^ *//')"
    done
    if ! wait "$mpid"; then
        grep -E 'error|Error' "$KLOG" | head -n 10 >&2
        die "could not provision the arm64 guest kernel: make Image failed (log: $KLOG)"
    fi
    BUILD_SECS=$(( $(date +%s) - t_build ))
    [[ -s "$BUILD/arch/arm64/boot/Image" ]] || die "could not provision the arm64 guest kernel: make succeeded but left no arch/arm64/boot/Image"
    new_tmp T .build-kernel
    cp "$BUILD/arch/arm64/boot/Image" "$T/Image"
    cp "$BUILD/.config" "$T/config"
    cp "$FRAGMENT" "$T/fragment.config"
    krel=$(cat "$BUILD/include/config/kernel.release" 2>/dev/null || echo unknown)
    echo "$krel" >"$T/kernel-version"
    printf 'source=%s=%s\nfragment_sha256=%s\ngcc=%s\nkernel_release=%s\nbuild_seconds=%s\njobs=%s\nbuilt=%s\n' \
        "$SRC_PKG" "$SRC_VER" "$(sha256sum "$FRAGMENT" | cut -d' ' -f1)" "$GCC_VER" "$krel" "$BUILD_SECS" "$JOBS" \
        "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$T/.complete"
    rm -rf "$KDIR"
    mv "$T" "$KDIR"
    log "kernel: $krel built in ${BUILD_SECS}s -> $KDIR/Image ($(du -k "$KDIR/Image" | cut -f1) KiB)"
    if [[ "${APERTURE_ARM64_KEEP_BUILD:-0}" == 1 ]]; then
        log "kernel: object tree kept (APERTURE_ARM64_KEEP_BUILD=1): $BUILD ($(du -sm "$BUILD" | cut -f1) MB)"
    else
        # The disk is shared: the object tree and the unpacked source go; the source
        # .deb stays, so a new fragment re-unpacks it (about 15 s) without the archive.
        log "kernel: deleting the object tree $BUILD ($(du -sm "$BUILD" | cut -f1) MB) and the unpacked source $SRC_DIR ($(du -sm "$SRC_DIR" | cut -f1) MB; APERTURE_ARM64_KEEP_BUILD=1 keeps both)"
        rm -rf "$BUILD" "$SRC_DIR"
    fi
fi
# Builds of other keys are replaced, not kept.
for d in "$CACHE"/kernel/* "$CACHE"/kbuild/*; do
    [[ -e "$d" ]] || continue
    [[ "$(basename "$d")" == "$KEY" ]] && continue
    log "kernel: removing the build of another key: $d"
    rm -rf "$d"
done
KREL=$(cat "$KDIR/kernel-version")

# ---------------------------------------------------------------------------------------
# 6. Smoke boot: this QEMU boots this kernel to a busybox shell and powers off
# ---------------------------------------------------------------------------------------
smoke="qemu-system-arm=$QEMU_DEB kernel=$KEY busybox=$(cat "$CACHE/tools/busybox.version")"
if [[ "$(cat "$CACHE/.smoke-ok" 2>/dev/null)" == "$smoke" ]]; then
    log "smoke boot: passed before for these versions"
else
    rm -f "$CACHE/.smoke-ok"
    new_tmp T .build-smoke
    mkdir -p "$T/root"/{bin,dev,proc,sys}
    cp "$BUSYBOX" "$T/root/bin/busybox"
    for a in sh mount cat echo poweroff uname; do ln -s busybox "$T/root/bin/$a"; done
    cat >"$T/root/init" <<'EOF'
#!/bin/sh
/bin/mount -t proc proc /proc
echo "APERTURE-ARM64-SMOKE $(uname -m) $(uname -r)"
/bin/poweroff -f
EOF
    chmod 0755 "$T/root/init"
    ( cd "$T/root" && find . | cpio -o -H newc --owner=0:0 --quiet ) | gzip -n >"$T/initrd.gz"
    log "smoke boot: $KREL on QEMU $QEMU_VERSION (virt, TCG; log: $CACHE/logs/boot-smoke.log)"
    t0=$(date +%s.%N)
    timeout -k 5 120 "$QEMU_WRAPPER" -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -machine virt -cpu cortex-a57 -accel tcg -smp 1 -m 256M \
        -kernel "$KDIR/Image" -initrd "$T/initrd.gz" -append "console=ttyAMA0 panic=-1 loglevel=4" \
        </dev/null >"$CACHE/logs/boot-smoke.log" 2>&1 || true
    secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    grep -q "APERTURE-ARM64-SMOKE aarch64 $KREL" "$CACHE/logs/boot-smoke.log" \
        || { tail -n 15 "$CACHE/logs/boot-smoke.log" >&2; die "the arm64 guest kernel $KREL does not boot to its init under QEMU $QEMU_VERSION (log: $CACHE/logs/boot-smoke.log)"; }
    echo "$smoke" >"$CACHE/.smoke-ok"
    log "smoke boot: ok, ${secs}s wall"
fi

# ---------------------------------------------------------------------------------------
# 7. Summary
# ---------------------------------------------------------------------------------------
ENVOUT="$CACHE/env"
cat >"$ENVOUT.tmp" <<EOF
APERTURE_ARM64_CACHE=$CACHE
APERTURE_ARM64_QEMU=$QEMU_WRAPPER
APERTURE_ARM64_QEMU_VERSION=$QEMU_VERSION
APERTURE_ARM64_QEMU_DEB=qemu-system-arm=$QEMU_DEB
APERTURE_ARM64_KERNEL=$KDIR/Image
APERTURE_ARM64_KERNEL_CONFIG=$KDIR/config
APERTURE_ARM64_KERNEL_RELEASE=$KREL
APERTURE_ARM64_KERNEL_SOURCE_DEB=$SRC_PKG=$SRC_VER
APERTURE_ARM64_KERNEL_KEY=$KEY
APERTURE_ARM64_BUSYBOX=$BUSYBOX
APERTURE_ARM64_BUSYBOX_DEB=$APERTURE_BUSYBOX_PACKAGE:arm64=$(cat "$CACHE/tools/busybox.version")
APERTURE_ARM64_DTC=$(command -v dtc)
APERTURE_ARM64_RESOLVED_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
EOF
mv -f "$ENVOUT.tmp" "$ENVOUT"
log "done in $(elapsed); summary also in $ENVOUT"
cat "$ENVOUT"
