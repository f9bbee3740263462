#!/usr/bin/env bash
# Provision everything needed to boot an unmodified Debian Linux 6.12 guest under QEMU TCG
# with a QEMU new enough (>= 10.1) to have `-device vfio-user-pci`:
#   - host tools (apt-get install on this bookworm host),
#   - a cached QEMU: debootstrap'ed trixie minbase tree + qemu-system-x86/-data from
#     trixie-backports, run through the tree's own dynamic loader by a wrapper script,
#   - the guest kernel (vmlinuz, PVH vmlinux) and its needed modules (decompressed),
#   - a static busybox for initramfs images (scripts/mkinitramfs.sh).
# Versions are policy (scripts/versions.env), not exact Debian revisions: every run reads
# the suites' package indexes through a private apt state and scripts/resolve.sh picks the
# versions (newest QEMU of the pinned series, newest kernel of the pinned series). What
# was picked and why is printed, and the env file names exactly what is installed. A
# cached part built for other versions is rebuilt and the old copy removed; without the
# archive, a complete cache of the last resolved versions is used, with a warning.
# What is installed is checked by what it must do: QEMU lists vfio-user-pci, the kernel
# has the options and modules the guest needs, and the two boot the smoke guest.
# Cache: ${APERTURE_CACHE:-$HOME/.cache/aperture}. Safe to re-run after a failure.
# Prints KEY=VALUE lines on stdout at the end (also written to $APERTURE_CACHE/env).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
usage: $0 [--refresh-qemu] [--refresh-kernel] [--refresh]
  --refresh-qemu    rebuild the QEMU tree even if the cached one is of the resolved version
  --refresh-kernel  re-extract the guest kernel and modules (re-uses the cached .deb)
  --refresh         both
env: APERTURE_CACHE (default \$HOME/.cache/aperture), APERTURE_APT_MIRROR (default: from
     /etc/apt sources), and any variable of scripts/versions.env (APERTURE_QEMU_SERIES,
     APERTURE_KERNEL_SERIES, ...; APERTURE_QEMU_DEB_VERSION or APERTURE_KERNEL_PACKAGE
     ask for one exact build instead of the newest of the series).
EOF
}

provision_args "$@"

CACHE="$APERTURE_CACHE"
take_cache_lock
mkdir -p "$CACHE"/{bin,debs,logs,tools,qemu,apt}
log "cache: $CACHE"

MIRROR="$(apt_mirror)" || die "could not determine a Debian mirror from /etc/apt/sources.list{,.d/*.sources,.d/*.list}; set APERTURE_APT_MIRROR"
log "Debian mirror (from this machine's apt sources): $MIRROR"

build_dirs "provisioning"

# ---------------------------------------------------------------------------------------
# 1. Host packages
# ---------------------------------------------------------------------------------------
HOST_APT_UPDATED=0
host_apt_update() {
    ((HOST_APT_UPDATED)) && return 0
    log "apt-get update (host)"
    apt-get update -q >"$CACHE/logs/host-apt-update.log" 2>&1 \
        || { tail -n 20 "$CACHE/logs/host-apt-update.log" >&2; die "host 'apt-get update' failed (log: $CACHE/logs/host-apt-update.log)"; }
    HOST_APT_UPDATED=1
}

missing=()
for p in $APERTURE_HOST_PACKAGES; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if ((${#missing[@]})); then
    host_apt_update
    log "installing host packages: ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
        >"$CACHE/logs/host-apt-install.log" 2>&1 \
        || { tail -n 20 "$CACHE/logs/host-apt-install.log" >&2; die "could not install host packages: ${missing[*]} (log: $CACHE/logs/host-apt-install.log)"; }
else
    log "host packages present: $APERTURE_HOST_PACKAGES"
fi
for tool in debootstrap chroot modinfo xz zstd cpio gzip flock dpkg-deb; do
    command -v "$tool" >/dev/null || die "host tool '$tool' is missing after installing host packages"
done
[[ -r "$DEBIAN_KEYRING" ]] || die "Debian archive keyring $DEBIAN_KEYRING is missing (package debian-archive-keyring)"

# ---------------------------------------------------------------------------------------
# 2. Versions: resolved from the suites' package indexes (scripts/resolve.sh)
# ---------------------------------------------------------------------------------------
# shellcheck source=resolve.sh
. "$APERTURE_SCRIPTS_DIR/resolve.sh"
# Private apt state for the QEMU backports suite and the kernel suite: the host's apt
# sources stay untouched. It also downloads the kernel .deb.
A="$CACHE/apt"
mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/sources.list.d"
printf 'deb [signed-by=%s] %s %s main\n' "$DEBIAN_KEYRING" "$MIRROR" "$APERTURE_QEMU_BACKPORTS_SUITE" \
    "$DEBIAN_KEYRING" "$MIRROR" "$APERTURE_KERNEL_SUITE" | sort -u >"$A/sources.list"
papt() {
    "$@" -o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts="$A/sources.list.d" \
         -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache" -o APT::Sandbox::User=root \
         -o Acquire::Languages=none -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
}
# suite_index SUITE: SUITE's Packages index as apt stored it, decompressed (nothing for a
# suite that apt has no index of).
suite_index() {
    local f
    while IFS= read -r f; do
        [[ -r "$f" ]] && /usr/lib/apt/apt-helper cat-file "$f"
    done < <(papt apt-get indextargets --format '$(FILENAME)' 'Identifier: Packages' "Release: $1")
}
# prev_env KEY: KEY of the env file the last successful run wrote (empty if none).
prev_env() { if [[ -r "$CACHE/env" ]]; then sed -n "s/^$1=//p" "$CACHE/env" | head -n1; fi; }

OFFLINE=0
log "versions: reading $APERTURE_QEMU_BACKPORTS_SUITE and $APERTURE_KERNEL_SUITE from $MIRROR (private apt state in $A)"
if papt apt-get -q --error-on=any update >"$CACHE/logs/resolve-apt.log" 2>&1; then
    QEMU_DEB=$(suite_index "$APERTURE_QEMU_BACKPORTS_SUITE" | resolve_qemu "$APERTURE_QEMU_BACKPORTS_SUITE" \
        "$APERTURE_QEMU_SERIES" "$APERTURE_QEMU_MIN_VERSION" "$APERTURE_QEMU_DEB_VERSION") \
        || die "could not provision QEMU: no build in the archive fits the policy of scripts/versions.env (above)"
    kpick=$(suite_index "$APERTURE_KERNEL_SUITE" | resolve_kernel "$APERTURE_KERNEL_SUITE" \
        "$APERTURE_KERNEL_SERIES" "$APERTURE_KERNEL_FLAVOUR" "$APERTURE_KERNEL_PACKAGE") \
        || die "could not provision the guest kernel: no build in the archive fits the policy of scripts/versions.env (above)"
    read -r KPKG KVER KREL <<<"$kpick"
    RESOLVED_AT=$(date -u +%Y-%m-%dT%H:%M:%SZ)
else
    tail -n 5 "$CACHE/logs/resolve-apt.log" >&2
    prev_qemu=$(prev_env APERTURE_QEMU_DEB) prev_kernel=$(prev_env APERTURE_KERNEL_DEB)
    [[ -n "$prev_qemu" && -n "$prev_kernel" ]] \
        || die "could not read the package indexes of $APERTURE_QEMU_BACKPORTS_SUITE and $APERTURE_KERNEL_SUITE on $MIRROR (log: $CACHE/logs/resolve-apt.log), and the cache holds no earlier resolution to fall back on"
    QEMU_DEB=${prev_qemu#qemu-system-x86=}
    KPKG=${prev_kernel%%=*} KVER=${prev_kernel#*=} KREL=${KPKG#linux-image-}
    RESOLVED_AT=$(prev_env APERTURE_RESOLVED_AT)
    OFFLINE=1
    warn "could not read the package indexes (log: $CACHE/logs/resolve-apt.log); using the versions resolved at $RESOLVED_AT: qemu-system-x86 $QEMU_DEB, $KPKG $KVER"
fi
# Re-checked here too: an offline fall-back or an override must not bring a refused kernel.
kernel_refused "${KREL%%[+-]*}" && die "guest kernel $KREL is in a known-bad range for virtio-iommu (6.15.x, 6.16.0-6.16.3); set APERTURE_KERNEL_SERIES in scripts/versions.env"
offline_die() { die "$* cannot be built without the archive (log: $CACHE/logs/resolve-apt.log)"; }

# ---------------------------------------------------------------------------------------
# 3. busybox-static (downloaded and unpacked into the cache, not installed on the host)
# ---------------------------------------------------------------------------------------
# Whatever the host's suite offers: bookworm main keeps one version, and any static
# busybox with insmod does.
BUSYBOX="$CACHE/tools/busybox"
if [[ -x "$BUSYBOX" && -s "$CACHE/tools/busybox.version" ]] && "$BUSYBOX" true 2>/dev/null \
   && "$BUSYBOX" --list | grep -qx insmod; then
    log "busybox: cached ($(cat "$CACHE/tools/busybox.version"))"
else
    ((!OFFLINE)) || offline_die "busybox"
    host_apt_update
    log "busybox: downloading $APERTURE_BUSYBOX_PACKAGE"
    new_tmp T .build-busybox
    ( cd "$T" && apt-get -q -o APT::Sandbox::User=root download "$APERTURE_BUSYBOX_PACKAGE" ) >"$CACHE/logs/busybox.log" 2>&1 \
        || { tail -n 20 "$CACHE/logs/busybox.log" >&2; die "could not download $APERTURE_BUSYBOX_PACKAGE with the host's apt (log: $CACHE/logs/busybox.log)"; }
    deb=$(echo "$T"/*.deb)
    dpkg-deb -x "$deb" "$T/x"
    [[ -x "$T/x/bin/busybox" ]] || die "$deb has no bin/busybox"
    "$T/x/bin/busybox" true || die "busybox from $deb does not run on this host"
    "$T/x/bin/busybox" --list | grep -qx insmod || die "busybox from $deb has no insmod applet"
    dpkg-deb -f "$deb" Version >"$T/version"
    mv -f "$T/x/bin/busybox" "$BUSYBOX.new" && mv -f "$BUSYBOX.new" "$BUSYBOX"
    mv -f "$T/version" "$CACHE/tools/busybox.version"
    log "busybox: $(cat "$CACHE/tools/busybox.version") -> $BUSYBOX"
fi

# ---------------------------------------------------------------------------------------
# 4. QEMU tree
# ---------------------------------------------------------------------------------------
QEMU_WRAPPER="$CACHE/bin/qemu-system-x86_64"
# qemu-storage-daemon from the same tree (qemu-utils): the third-party vhost-user-blk
# back-end of the implicit-grant tests.
QSD_WRAPPER="$CACHE/bin/qemu-storage-daemon"
qemu_tag=$(printf '%s_%s_%s' "$APERTURE_QEMU_SUITE" "$APERTURE_QEMU_BACKPORTS_SUITE" "$QEMU_DEB" | tr -c 'A-Za-z0-9.+_\n-' '_')
QDIR="$CACHE/qemu/$qemu_tag"

# write_wrapper ROOT OUTFILE: a shell script running ROOT's QEMU through ROOT's own loader.
write_wrapper() {
    local root="$1" out="$2"
    cat >"$out.tmp" <<EOF
#!/bin/sh
# Generated by aperture scripts/provision.sh — do not edit; re-run provision.sh instead.
# QEMU $QEMU_DEB ($APERTURE_QEMU_BACKPORTS_SUITE) from the Debian tree below,
# run through that tree's own dynamic loader (no chroot), with its firmware/data dirs.
R='$root'
export QEMU_MODULE_DIR="\$R/usr/lib/x86_64-linux-gnu/qemu"
exec "\$R/usr/lib64/ld-linux-x86-64.so.2" --inhibit-cache \\
    --library-path "\$R/usr/lib/x86_64-linux-gnu" --argv0 qemu-system-x86_64 \\
    "\$R/usr/bin/qemu-system-x86_64" -L "\$R/usr/share/seabios" -L "\$R/usr/share/qemu" "\$@"
EOF
    chmod 0755 "$out.tmp"
    mv -f "$out.tmp" "$out"
}

# write_tool_wrapper ROOT OUTFILE NAME: the same for another program of the tree (no firmware).
write_tool_wrapper() {
    local root="$1" out="$2" name="$3"
    cat >"$out.tmp" <<EOF
#!/bin/sh
# Generated by aperture scripts/provision.sh — do not edit; re-run provision.sh instead.
# $name of QEMU $QEMU_DEB ($APERTURE_QEMU_BACKPORTS_SUITE) from the Debian tree below,
# run through that tree's own dynamic loader (no chroot).
R='$root'
exec "\$R/usr/lib64/ld-linux-x86-64.so.2" --inhibit-cache \\
    --library-path "\$R/usr/lib/x86_64-linux-gnu" --argv0 $name "\$R/usr/bin/$name" "\$@"
EOF
    chmod 0755 "$out.tmp"
    mv -f "$out.tmp" "$out"
}

# check_qsd WRAPPER: fails, saying why, unless it runs and exports vhost-user-blk.
check_qsd() {
    local out
    out=$("$1" --version 2>&1) || { printf 'qemu-storage-daemon --version failed: %s\n' "$(tail -n 2 <<<"$out")" >&2; return 1; }
    out=$("$1" --help 2>&1) || true
    grep -q 'vhost-user-blk' <<<"$out" || { printf 'qemu-storage-daemon has no vhost-user-blk export: %s\n' "$(tail -n 2 <<<"$out")" >&2; return 1; }
}

# check_qemu WRAPPER: prints the version number; fails, saying what is missing, if it is
# older than the floor or does not list vfio-user-pci among its devices.
check_qemu() {
    local w="$1" out ver help
    out=$("$w" --version 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
    ver=$(printf '%s\n' "$out" | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | head -n1)
    [[ -n "$ver" ]] || { printf 'unexpected --version output: %s\n' "$out" >&2; return 1; }
    version_ge "$ver" "$APERTURE_QEMU_MIN_VERSION" || { printf 'QEMU %s is older than %s\n' "$ver" "$APERTURE_QEMU_MIN_VERSION" >&2; return 1; }
    if help=$("$w" -machine none -device help 2>&1); then
        grep -q '"vfio-user-pci"' <<<"$help" || { printf 'QEMU %s does not list vfio-user-pci in -device help\n' "$ver" >&2; return 1; }
    elif grep -q 'Only modules from the same build' <<<"$help"; then
        # A host-installed QEMU's modules get in the way of the full list (scripts/README.md).
        "$w" -machine none -device vfio-user-pci,help >/dev/null 2>&1 \
            || { printf 'QEMU %s has no usable -device vfio-user-pci\n' "$ver" >&2; return 1; }
    else
        printf 'QEMU %s: -device help failed: %s\n' "$ver" "$(tail -n 2 <<<"$help")" >&2; return 1
    fi
    printf '%s\n' "$ver"
}

qemu_ok=0
if ((!REFRESH_QEMU)) && [[ -f "$QDIR/.complete" ]]; then
    write_wrapper "$QDIR/root" "$QEMU_WRAPPER"
    write_tool_wrapper "$QDIR/root" "$QSD_WRAPPER" qemu-storage-daemon
    if QEMU_VERSION=$(check_qemu "$QEMU_WRAPPER") && check_qsd "$QSD_WRAPPER"; then
        qemu_ok=1
        log "QEMU: cached tree $QDIR (QEMU $QEMU_VERSION)"
    else
        warn "cached QEMU tree $QDIR does not work; rebuilding it"
    fi
fi

if ((!qemu_ok)); then
    ((!OFFLINE)) || offline_die "the QEMU tree of qemu-system-x86 $QEMU_DEB"
    stale=$(find "$CACHE/qemu" -mindepth 1 -maxdepth 1 ! -name "$qemu_tag" -printf '%f ' 2>/dev/null || true)
    [[ -z "$stale" ]] || log "QEMU: the cache holds a tree of other versions ($stale); building $QEMU_DEB to replace it"
    new_tmp B .build-qemu
    R="$B/root"
    log "QEMU: debootstrap --variant=minbase $APERTURE_QEMU_SUITE (about 30-60 s; log: $CACHE/logs/debootstrap.log)"
    debootstrap --variant=minbase --components=main --keyring="$DEBIAN_KEYRING" \
        "$APERTURE_QEMU_SUITE" "$R" "$MIRROR" >"$CACHE/logs/debootstrap.log" 2>&1 \
        || { tail -n 30 "$CACHE/logs/debootstrap.log" >&2; die "could not provision the QEMU tree: debootstrap $APERTURE_QEMU_SUITE from $MIRROR failed"; }
    log "QEMU: base tree done at $(elapsed) ($(du -sm "$R" | cut -f1) MB)"

    echo "deb $MIRROR $APERTURE_QEMU_BACKPORTS_SUITE main" >"$R/etc/apt/sources.list.d/aperture-backports.list"
    rm -f "$R/etc/resolv.conf"; cp -L /etc/resolv.conf "$R/etc/resolv.conf" 2>/dev/null || true
    printf '#!/bin/sh\nexit 101\n' >"$R/usr/sbin/policy-rc.d"; chmod 0755 "$R/usr/sbin/policy-rc.d"
    # A fresh proc instance (not a bind mount of the host's /proc or /dev): nothing to leak.
    mount -t proc proc "$R/proc"
    in_tree() { chroot "$R" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
                    DEBIAN_FRONTEND=noninteractive LC_ALL=C.UTF-8 "$@"; }
    log "QEMU: apt-get update in tree ($APERTURE_QEMU_SUITE + $APERTURE_QEMU_BACKPORTS_SUITE)"
    in_tree apt-get -q --error-on=any -o Acquire::Languages=none update >"$CACHE/logs/qemu-apt.log" 2>&1 \
        || { tail -n 20 "$CACHE/logs/qemu-apt.log" >&2; die "could not provision QEMU: apt-get update in the $APERTURE_QEMU_SUITE tree failed"; }
    log "QEMU: installing qemu-system-x86=$QEMU_DEB qemu-system-data qemu-utils (-t $APERTURE_QEMU_BACKPORTS_SUITE)"
    in_tree apt-get install -y -q --no-install-recommends -t "$APERTURE_QEMU_BACKPORTS_SUITE" \
        "qemu-system-x86=$QEMU_DEB" "qemu-system-data=$QEMU_DEB" "qemu-utils=$QEMU_DEB" \
        >>"$CACHE/logs/qemu-apt.log" 2>&1 \
        || { tail -n 30 "$CACHE/logs/qemu-apt.log" >&2; die "could not provision QEMU: apt-get install qemu-system-x86=$QEMU_DEB failed in the tree (the archive may have moved on since it was read: re-run; log: $CACHE/logs/qemu-apt.log)"; }
    in_tree dpkg-query -W -f='${Package} ${Version}\n' 'qemu-*' 'seabios' 'ipxe-qemu' 'libc6' >"$B/packages.txt" 2>/dev/null || true
    in_tree apt-get clean
    umount "$R/proc"
    # Footprint: package lists, docs, man pages and locales are not needed to run QEMU.
    rm -rf "$R"/var/lib/apt/lists/* "$R"/var/cache/apt/*.bin "$R"/usr/share/doc/* "$R"/usr/share/man/* \
           "$R"/usr/share/info/* "$R"/usr/share/locale/* "$R"/var/log/*.log "$R"/var/log/apt/*
    # Absolute symlinks in the data/firmware dirs (e.g. usr/share/qemu/bios-256k.bin ->
    # /usr/share/seabios/bios-256k.bin) would resolve on the HOST; make them tree-relative.
    while IFS= read -r link; do
        target=$(readlink "$link")
        [[ "$target" == /* ]] || continue
        ln -sfn "$(realpath -s -m --relative-to="$(dirname "$link")" "$R$target")" "$link"
        [[ -e "$link" ]] || warn "firmware link $link -> $target has no target in the tree"
    done < <(find "$R/usr/share/qemu" "$R/usr/share/seabios" -type l 2>/dev/null)
    # QEMU's compiled-in firmware path is /usr/share/qemu:/usr/share/seabios (host paths!);
    # the wrapper passes the tree's copies with -L, SeaBIOS first.
    [[ -s "$R/usr/share/seabios/bios-256k.bin" ]] || die "could not provision QEMU: tree has no usr/share/seabios/bios-256k.bin"
    [[ -s "$R/usr/share/qemu/linuxboot_dma.bin" ]] || die "could not provision QEMU: tree has no usr/share/qemu/linuxboot_dma.bin"
    [[ -x "$R/usr/lib64/ld-linux-x86-64.so.2" ]] || die "could not provision QEMU: tree has no usr/lib64/ld-linux-x86-64.so.2"

    write_wrapper "$R" "$B/wrapper-check"
    QEMU_VERSION=$(check_qemu "$B/wrapper-check") || die "could not provision QEMU: qemu-system-x86 $QEMU_DEB fails its check (above)"
    write_tool_wrapper "$R" "$B/wrapper-check" qemu-storage-daemon
    check_qsd "$B/wrapper-check" || die "could not provision QEMU: qemu-utils $QEMU_DEB's qemu-storage-daemon fails its check (above)"
    rm -f "$B/wrapper-check"
    {
        echo "qemu_version=$QEMU_VERSION"
        echo "deb_version=$QEMU_DEB"
        echo "suites=$APERTURE_QEMU_SUITE $APERTURE_QEMU_BACKPORTS_SUITE"
        echo "mirror=$MIRROR"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$B/.complete"

    # Swap into place: old copy aside, new in, wrapper switched, old copy deleted.
    if [[ -e "$QDIR" ]]; then OLD=$(mktemp -u "$CACHE/.old-qemu.XXXXXX"); mv "$QDIR" "$OLD"; else OLD=; fi
    mv "$B" "$QDIR"
    write_wrapper "$QDIR/root" "$QEMU_WRAPPER"
    write_tool_wrapper "$QDIR/root" "$QSD_WRAPPER" qemu-storage-daemon
    if [[ -n "$OLD" ]]; then safe_rm_tree "$OLD"; fi
    QEMU_VERSION=$(check_qemu "$QEMU_WRAPPER") || die "could not provision QEMU: wrapper $QEMU_WRAPPER does not work after installing the tree"
    log "QEMU: $QEMU_VERSION ready at $(elapsed) (tree $(du -sm "$QDIR" | cut -f1) MB)"
fi
# Trees of other versions are replaced, not kept: the wrapper runs only this one.
for d in "$CACHE"/qemu/*; do
    [[ "$d" == "$QDIR" ]] && continue
    log "QEMU: removing the tree of other versions: $d"
    safe_rm_tree "$d"
done

# ---------------------------------------------------------------------------------------
# 5. Guest kernel and modules
# ---------------------------------------------------------------------------------------
GDIR="$CACHE/guest"
kstamp="package=$KPKG version=$KVER release=$KREL modules=$APERTURE_GUEST_MODULES"
KDEB="$CACHE/debs/${KPKG}_${KVER//:/%3a}_amd64.deb"

# check_guest DIR: the kernel in DIR can boot our guest: the options it needs, a PVH
# vmlinux, and every wanted module built for exactly this kernel (never modules of one
# kernel beside another). Fails naming what is missing.
check_guest() {
    local dir="$1" req opt ok val ko vm
    [[ -s "$dir/vmlinuz" && -s "$dir/config" && -s "$dir/modules/load-order" ]] || { echo "incomplete: no vmlinuz, config or modules/load-order" >&2; return 1; }
    [[ "$(od -An -c -N4 "$dir/vmlinux" 2>/dev/null | tr -d ' ')" == '177ELF' ]] || { echo "no PVH vmlinux (ELF)" >&2; return 1; }
    for req in VIRTIO_IOMMU:my ACPI_VIOT:y VIRTIO_PCI:my VIRTIO_BLK:my HW_RANDOM_VIRTIO:my PVH:y DEVTMPFS:y SERIAL_8250_CONSOLE:y; do
        opt=${req%%:*} ok=${req#*:} val=$(sed -n "s/^CONFIG_$opt=//p" "$dir/config")
        [[ -n "$val" && "$ok" == *"$val"* ]] || { echo "$KREL has CONFIG_$opt=${val:-unset} (need one of: $ok, where m=module y=built-in)" >&2; return 1; }
    done
    while IFS= read -r ko; do
        [[ -s "$dir/modules/$ko" ]] || { echo "module $ko is in load-order but missing" >&2; return 1; }
        vm=$(modinfo -F vermagic "$dir/modules/$ko" 2>/dev/null) || { echo "modinfo cannot read $ko" >&2; return 1; }
        [[ "$vm" == "$KREL "* ]] || { echo "module $ko is built for ${vm%% *}, not for $KREL" >&2; return 1; }
    done <"$dir/modules/load-order"
}

guest_ok=0
if ((!REFRESH_KERNEL)) && [[ -f "$GDIR/.stamp" ]]; then
    if [[ "$(cat "$GDIR/.stamp")" != "$kstamp" ]]; then
        log "guest kernel: the cache holds $(sed 's/ modules=.*//' "$GDIR/.stamp"), not $KPKG $KVER; replacing it"
    elif why=$(check_guest "$GDIR" 2>&1); then
        guest_ok=1
        log "guest kernel: cached $KPKG $KVER"
    else
        warn "cached guest kernel does not pass its check ($why); rebuilding it"
    fi
fi

if ((!guest_ok)); then
    if ! { [[ -s "$KDEB" ]] && dpkg-deb -f "$KDEB" Version >/dev/null 2>&1; }; then
        ((!OFFLINE)) || offline_die "the guest kernel $KPKG $KVER"
        log "guest kernel: downloading $KPKG=$KVER"
        new_tmp T .build-kdeb
        ( cd "$T" && papt apt-get -q download "$KPKG=$KVER" ) >"$CACHE/logs/kernel-apt.log" 2>&1 \
            || { tail -n 20 "$CACHE/logs/kernel-apt.log" >&2; die "could not provision the guest kernel: download of $KPKG=$KVER failed (the archive may have moved on since it was read: re-run; log: $CACHE/logs/kernel-apt.log)"; }
        mv -f "$T"/*.deb "$KDEB"
    fi
    log "guest kernel: extracting $(basename "$KDEB")"
    new_tmp T .build-guest
    dpkg-deb -x "$KDEB" "$T/x"
    out="$T/guest"; mkdir -p "$out/modules"
    vmlinuz="$T/x/boot/vmlinuz-$KREL"; config="$T/x/boot/config-$KREL"
    [[ -s "$vmlinuz" && -s "$config" ]] || die "could not provision the guest kernel: $KDEB has no boot/vmlinuz-$KREL or boot/config-$KREL"
    MROOT=
    for m in "$T/x/lib/modules/$KREL" "$T/x/usr/lib/modules/$KREL"; do [[ -d "$m" ]] && MROOT="$m"; done
    [[ -n "$MROOT" ]] || die "could not provision the guest kernel: $KDEB has no lib/modules/$KREL"

    cp "$vmlinuz" "$out/vmlinuz"
    cp "$config" "$out/config"
    # PVH-bootable ELF vmlinux (QEMU boots it ~4 s faster under TCG: no in-guest decompression).
    # bzImage header: setup_sects @0x1f1, payload_offset/payload_length @0x248; the payload ends
    # with a 4-byte uncompressed size that the decompressor must not see.
    ss=$(od -An -tu1 -j $((0x1f1)) -N1 "$vmlinuz" | tr -d ' '); ((ss)) || ss=4
    read -r po pl < <(od -An -tu4 -j $((0x248)) -N8 "$vmlinuz")
    off=$(((ss + 1) * 512 + po))
    magic=$(od -An -tx1 -j "$off" -N6 "$vmlinuz" | tr -d ' \n')
    case "$magic" in
        28b52ffd*)     dec=(zstd -dc) ;;
        fd377a585a00)  dec=(xz -dc) ;;
        1f8b*)         dec=(gzip -dc) ;;
        *) die "could not provision the guest kernel: unknown bzImage payload compression (magic $magic)" ;;
    esac
    dd if="$vmlinuz" bs=1M iflag=skip_bytes,count_bytes skip="$off" count=$((pl - 4)) status=none \
        | "${dec[@]}" >"$out/vmlinux" \
        || die "could not provision the guest kernel: extracting vmlinux from the bzImage failed"

    # Modules: name -> file index, built-in list, then dependency closure in load order.
    declare -A MODFILE=() BUILTIN=() SEEN=()
    while IFS= read -r f; do
        n=$(basename "$f"); n=${n%%.ko*}; MODFILE[${n//-/_}]="$f"
    done < <(find "$MROOT/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
    if [[ -r "$MROOT/modules.builtin" ]]; then
        while IFS= read -r f; do n=$(basename "$f" .ko); BUILTIN[${n//-/_}]=1; done <"$MROOT/modules.builtin"
    fi
    ORDER=() BUILTIN_WANTED=()
    add_module() {   # add_module NAME CHAIN
        local name=${1//-/_} chain="$2" f ko deps d
        [[ -n "${SEEN[$name]:-}" ]] && return 0
        SEEN[$name]=1
        if [[ -n "${BUILTIN[$name]:-}" ]]; then BUILTIN_WANTED+=("$name"); return 0; fi
        f=${MODFILE[$name]:-}
        [[ -n "$f" ]] || die "could not provision the guest modules: '$name' (needed by: ${chain:-versions.env}) is neither a module nor built into $KREL"
        ko="$out/modules/$(basename "${f%.ko*}").ko"
        case "$f" in
            *.ko.xz)  xz -dc "$f" >"$ko" ;;
            *.ko.zst) zstd -qdc "$f" >"$ko" ;;
            *.ko.gz)  gzip -dc "$f" >"$ko" ;;
            *)        cp "$f" "$ko" ;;
        esac
        deps=$(modinfo -F depends "$ko") || die "modinfo failed on $ko"
        for d in ${deps//,/ }; do add_module "$d" "$name${chain:+ <- $chain}"; done
        ORDER+=("$(basename "$ko")")
    }
    for m in $APERTURE_GUEST_MODULES; do add_module "$m" ""; done
    printf '%s\n' "${ORDER[@]}" >"$out/modules/load-order"
    printf '%s\n' "${BUILTIN_WANTED[@]}" >"$out/modules/builtin"
    echo "$KREL" >"$out/kernel-version"
    why=$(check_guest "$out" 2>&1) || die "could not provision the guest kernel: $why; pick another kernel in scripts/versions.env"
    echo "$kstamp" >"$out/.stamp"
    log "guest kernel: $KREL; modules (load order): ${ORDER[*]}; built in: ${BUILTIN_WANTED[*]:-none}"

    # The whole directory is replaced at once: kernel and modules always come from one .deb.
    if [[ -e "$GDIR" ]]; then OLD=$(mktemp -u "$CACHE/.old-guest.XXXXXX"); mv "$GDIR" "$OLD"; else OLD=; fi
    mv "$out" "$GDIR"
    if [[ -n "$OLD" ]]; then safe_rm_tree "$OLD"; fi
fi
# Kernel packages of other versions are replaced, not kept.
for d in "$CACHE"/debs/*.deb; do
    [[ -e "$d" && "$d" != "$KDEB" ]] || continue
    log "guest kernel: removing the package of other versions: $d"
    rm -f "$d"
done

# ---------------------------------------------------------------------------------------
# 6. The smoke boot: this QEMU boots this kernel (once per pair of versions)
# ---------------------------------------------------------------------------------------
[[ -n "${QEMU_VERSION:-}" ]] || die "internal: QEMU version unknown"
smoke="qemu-system-x86=$QEMU_DEB $KPKG=$KVER busybox=$(cat "$CACHE/tools/busybox.version")"
if [[ "$(cat "$CACHE/.smoke-ok" 2>/dev/null)" == "$smoke" ]]; then
    log "smoke boot: passed before for these versions"
else
    rm -f "$CACHE/.smoke-ok"
    log "smoke boot: QEMU $QEMU_VERSION boots $KREL (log: $CACHE/logs/boot-smoke.log)"
    "$APERTURE_SCRIPTS_DIR/boot-smoke.sh" >"$CACHE/logs/boot-smoke.log" 2>&1 \
        || { grep -E 'ERROR|FAIL' "$CACHE/logs/boot-smoke.log" | tail -n 3 >&2
             die "QEMU $QEMU_DEB and kernel $KPKG $KVER do not boot the smoke guest (log: $CACHE/logs/boot-smoke.log)"; }
    echo "$smoke" >"$CACHE/.smoke-ok"
    log "smoke boot: $(grep -o 'boot took [0-9.]*s wall' "$CACHE/logs/boot-smoke.log" || echo passed)"
fi

# ---------------------------------------------------------------------------------------
# 7. Summary: exactly what is installed, for every later run and report
# ---------------------------------------------------------------------------------------
ENVOUT="$CACHE/env"
cat >"$ENVOUT.tmp" <<EOF
APERTURE_CACHE=$CACHE
APERTURE_QEMU=$QEMU_WRAPPER
APERTURE_QEMU_VERSION=$QEMU_VERSION
APERTURE_QEMU_DEB=qemu-system-x86=$QEMU_DEB
APERTURE_QSD=$QSD_WRAPPER
APERTURE_KERNEL=$GDIR/vmlinuz
APERTURE_KERNEL_PVH=$GDIR/vmlinux
APERTURE_KERNEL_RELEASE=$(cat "$GDIR/kernel-version")
APERTURE_KERNEL_DEB=$KPKG=$KVER
APERTURE_MODULES=$GDIR/modules
APERTURE_BUSYBOX=$BUSYBOX
APERTURE_BUSYBOX_DEB=$APERTURE_BUSYBOX_PACKAGE=$(cat "$CACHE/tools/busybox.version")
APERTURE_RESOLVED_AT=$RESOLVED_AT
EOF
mv -f "$ENVOUT.tmp" "$ENVOUT"
log "done in $(elapsed); summary also in $ENVOUT"
cat "$ENVOUT"
