#!/usr/bin/env bash
# Provision everything needed to boot an unmodified Debian Linux 6.12 guest under QEMU TCG
# with a QEMU new enough (>= 10.1) to have `-device vfio-user-pci`:
#   - host tools (apt-get install on this bookworm host),
#   - a cached QEMU: debootstrap'ed trixie minbase tree + qemu-system-x86/-data from
#     trixie-backports, run through the tree's own dynamic loader by a wrapper script,
#   - the guest kernel (vmlinuz, PVH vmlinux) and its needed modules (decompressed),
#   - a static busybox for initramfs images (scripts/mkinitramfs.sh).
# Versions: scripts/versions.env. Cache: ${APERTURE_CACHE:-$HOME/.cache/aperture}.
# Idempotent: a second run only checks the cache. Safe to re-run after a failure.
# Prints KEY=VALUE lines on stdout at the end (also written to $APERTURE_CACHE/env).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
usage: $0 [--refresh-qemu] [--refresh-kernel] [--refresh]
  --refresh-qemu    rebuild the QEMU tree even if the cached one matches versions.env
  --refresh-kernel  re-extract the guest kernel and modules (re-uses the cached .deb)
  --refresh         both
env: APERTURE_CACHE (default \$HOME/.cache/aperture), APERTURE_APT_MIRROR (default: from
     /etc/apt sources), and any variable of scripts/versions.env.
EOF
}

REFRESH_QEMU=0 REFRESH_KERNEL=0
while (($#)); do
    case "$1" in
        --refresh-qemu) REFRESH_QEMU=1 ;;
        --refresh-kernel) REFRESH_KERNEL=1 ;;
        --refresh) REFRESH_QEMU=1 REFRESH_KERNEL=1 ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done

[[ "$(uname -m)" == x86_64 ]] || die "this provisioning supports x86_64 hosts only (got $(uname -m))"
[[ "$(id -u)" == 0 ]] || die "must run as root (apt-get install, debootstrap and chroot need it)"

CACHE="$APERTURE_CACHE"
take_cache_lock
mkdir -p "$CACHE"/{bin,debs,logs,tools,qemu,apt}
log "cache: $CACHE"

MIRROR="$(apt_mirror)" || die "could not determine a Debian mirror from /etc/apt/sources.list{,.d/*.sources,.d/*.list}; set APERTURE_APT_MIRROR"
log "Debian mirror (from this machine's apt sources): $MIRROR"

# Temporary build directories; removed on exit (after unmounting anything inside them).
TMPDIRS=()
cleanup() {
    local rc=$? d
    for d in "${TMPDIRS[@]}"; do
        if ((rc != 0)) && [[ -n "${APERTURE_KEEP_FAILED:-}" ]]; then
            for m in $(mounts_under "$d"); do umount "$m" 2>/dev/null || umount -l "$m" || true; done
            printf '[%s] kept for debugging (APERTURE_KEEP_FAILED): %s\n' "$_ap_prog" "$d" >&2
            continue
        fi
        safe_rm_tree "$d" || rc=1
    done
    if ((rc != 0)); then
        printf '[%s] ERROR: provisioning FAILED (exit %d); logs in %s/logs\n' "$_ap_prog" "$rc" "$CACHE" >&2
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# new_tmp VAR PREFIX: VAR=fresh temp dir under the cache (same filesystem, so mv is a rename).
new_tmp() { local -n _v=$1; _v=$(mktemp -d "$CACHE/$2.XXXXXX"); TMPDIRS+=("$_v"); }

# Remove leftovers of interrupted runs (build dirs are only ever renamed into place when complete).
shopt -s nullglob
for stale in "$CACHE"/.build-* "$CACHE"/.old-*; do
    log "removing leftover of an interrupted run: $stale"
    safe_rm_tree "$stale"
done
shopt -u nullglob

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
# 2. busybox-static (downloaded and unpacked into the cache, not installed on the host)
# ---------------------------------------------------------------------------------------
BUSYBOX="$CACHE/tools/busybox"
if [[ -x "$BUSYBOX" && -s "$CACHE/tools/busybox.version" ]] && "$BUSYBOX" true 2>/dev/null \
   && { [[ -z "$APERTURE_BUSYBOX_DEB_VERSION" ]] || [[ "$(cat "$CACHE/tools/busybox.version")" == "$APERTURE_BUSYBOX_DEB_VERSION" ]]; }; then
    log "busybox: cached ($(cat "$CACHE/tools/busybox.version"))"
else
    host_apt_update
    spec="$APERTURE_BUSYBOX_PACKAGE${APERTURE_BUSYBOX_DEB_VERSION:+=$APERTURE_BUSYBOX_DEB_VERSION}"
    log "busybox: downloading $spec"
    new_tmp T .build-busybox
    ( cd "$T" && apt-get -q -o APT::Sandbox::User=root download "$spec" ) >"$CACHE/logs/busybox.log" 2>&1 \
        || { tail -n 20 "$CACHE/logs/busybox.log" >&2; die "could not download $spec with the host's apt"; }
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
# 3. QEMU tree
# ---------------------------------------------------------------------------------------
QEMU_WRAPPER="$CACHE/bin/qemu-system-x86_64"
qemu_tag=$(printf '%s_%s_%s' "$APERTURE_QEMU_SUITE" "$APERTURE_QEMU_BACKPORTS_SUITE" "$APERTURE_QEMU_DEB_VERSION" | tr -c 'A-Za-z0-9.+_\n-' '_')
QDIR="$CACHE/qemu/$qemu_tag"

# write_wrapper ROOT OUTFILE: a shell script running ROOT's QEMU through ROOT's own loader.
write_wrapper() {
    local root="$1" out="$2"
    cat >"$out.tmp" <<EOF
#!/bin/sh
# Generated by aperture scripts/provision.sh — do not edit; re-run provision.sh instead.
# QEMU $APERTURE_QEMU_DEB_VERSION ($APERTURE_QEMU_BACKPORTS_SUITE) from the Debian tree below,
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

# check_qemu WRAPPER: prints the version number; fails if too old or no vfio-user-pci.
check_qemu() {
    local w="$1" out ver
    out=$("$w" --version 2>&1) || { printf '%s\n' "$out" >&2; return 1; }
    ver=$(printf '%s\n' "$out" | sed -n 's/^QEMU emulator version \([0-9][0-9.]*\).*/\1/p' | head -n1)
    [[ -n "$ver" ]] || { printf 'unexpected --version output: %s\n' "$out" >&2; return 1; }
    version_ge "$ver" "$APERTURE_QEMU_MIN_VERSION" || { printf 'QEMU %s is older than %s\n' "$ver" "$APERTURE_QEMU_MIN_VERSION" >&2; return 1; }
    "$w" -machine none -device vfio-user-pci,help >/dev/null 2>&1 \
        || { printf 'QEMU %s has no usable -device vfio-user-pci\n' "$ver" >&2; return 1; }
    printf '%s\n' "$ver"
}

qemu_ok=0
if ((!REFRESH_QEMU)) && [[ -f "$QDIR/.complete" ]]; then
    write_wrapper "$QDIR/root" "$QEMU_WRAPPER"
    if QEMU_VERSION=$(check_qemu "$QEMU_WRAPPER"); then
        qemu_ok=1
        log "QEMU: cached tree $QDIR (QEMU $QEMU_VERSION)"
    else
        warn "cached QEMU tree $QDIR does not work; rebuilding it"
    fi
fi

if ((!qemu_ok)); then
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
    for p in qemu-system-x86 qemu-system-data; do
        if ! in_tree apt-cache madison "$p" | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | grep -qxF "$APERTURE_QEMU_DEB_VERSION"; then
            printf 'available versions of %s:\n' "$p" >&2; in_tree apt-cache madison "$p" >&2 || true
            die "could not provision QEMU: $p=$APERTURE_QEMU_DEB_VERSION is not on $MIRROR ($APERTURE_QEMU_SUITE/$APERTURE_QEMU_BACKPORTS_SUITE); update APERTURE_QEMU_DEB_VERSION in scripts/versions.env"
        fi
    done
    log "QEMU: installing qemu-system-x86=$APERTURE_QEMU_DEB_VERSION qemu-system-data (-t $APERTURE_QEMU_BACKPORTS_SUITE)"
    in_tree apt-get install -y -q --no-install-recommends -t "$APERTURE_QEMU_BACKPORTS_SUITE" \
        "qemu-system-x86=$APERTURE_QEMU_DEB_VERSION" "qemu-system-data=$APERTURE_QEMU_DEB_VERSION" \
        >>"$CACHE/logs/qemu-apt.log" 2>&1 \
        || { tail -n 30 "$CACHE/logs/qemu-apt.log" >&2; die "could not provision QEMU: apt-get install qemu-system-x86=$APERTURE_QEMU_DEB_VERSION failed in the tree (log: $CACHE/logs/qemu-apt.log)"; }
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
    QEMU_VERSION=$(check_qemu "$B/wrapper-check") || die "could not provision QEMU: the freshly built tree does not run (see above)"
    rm -f "$B/wrapper-check"
    {
        echo "qemu_version=$QEMU_VERSION"
        echo "deb_version=$APERTURE_QEMU_DEB_VERSION"
        echo "suites=$APERTURE_QEMU_SUITE $APERTURE_QEMU_BACKPORTS_SUITE"
        echo "mirror=$MIRROR"
        echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    } >"$B/.complete"

    # Swap into place: old copy aside, new in, wrapper switched, old copy deleted.
    if [[ -e "$QDIR" ]]; then OLD=$(mktemp -u "$CACHE/.old-qemu.XXXXXX"); mv "$QDIR" "$OLD"; else OLD=; fi
    mv "$B" "$QDIR"
    write_wrapper "$QDIR/root" "$QEMU_WRAPPER"
    if [[ -n "$OLD" ]]; then safe_rm_tree "$OLD"; fi
    QEMU_VERSION=$(check_qemu "$QEMU_WRAPPER") || die "could not provision QEMU: wrapper $QEMU_WRAPPER does not work after installing the tree"
    log "QEMU: $QEMU_VERSION ready at $(elapsed) (tree $(du -sm "$QDIR" | cut -f1) MB)"
fi
# Drop trees of other (older) pins.
for d in "$CACHE"/qemu/*; do
    [[ "$d" == "$QDIR" ]] && continue
    log "QEMU: removing tree of a previous pin: $d"
    safe_rm_tree "$d"
done

# ---------------------------------------------------------------------------------------
# 4. Guest kernel and modules
# ---------------------------------------------------------------------------------------
GDIR="$CACHE/guest"
KREL="$APERTURE_KERNEL_RELEASE"
kstamp="package=$APERTURE_KERNEL_PACKAGE version=$APERTURE_KERNEL_DEB_VERSION release=$KREL modules=$APERTURE_GUEST_MODULES"

# Known-bad upstream ranges for virtio-iommu probing: 6.15.x and 6.16.0-6.16.3.
kup=${KREL%%[+-]*}
case "$kup" in
    6.15|6.15.*|6.16|6.16.[0-3]) die "guest kernel $KREL is in a known-bad range for virtio-iommu (6.15.x, 6.16.0-6.16.3); pick another in scripts/versions.env" ;;
esac

if ((!REFRESH_KERNEL)) && [[ -f "$GDIR/.stamp" && "$(cat "$GDIR/.stamp")" == "$kstamp" \
      && -s "$GDIR/vmlinuz" && -s "$GDIR/vmlinux" && -s "$GDIR/modules/load-order" ]]; then
    log "guest kernel: cached $KREL"
else
    KDEB="$CACHE/debs/${APERTURE_KERNEL_PACKAGE}_${APERTURE_KERNEL_DEB_VERSION}_amd64.deb"
    if ! { [[ -s "$KDEB" ]] && dpkg-deb -f "$KDEB" Version >/dev/null 2>&1; }; then
        # Private apt state: the host's apt sources stay untouched.
        A="$CACHE/apt"
        mkdir -p "$A/lists/partial" "$A/cache/archives/partial" "$A/sources.list.d"
        echo "deb [signed-by=$DEBIAN_KEYRING] $MIRROR $APERTURE_KERNEL_SUITE main" >"$A/sources.list"
        kapt() {
            "$@" -o Dir::Etc::SourceList="$A/sources.list" -o Dir::Etc::SourceParts="$A/sources.list.d" \
                 -o Dir::State::Lists="$A/lists" -o Dir::Cache="$A/cache" -o APT::Sandbox::User=root \
                 -o Acquire::Languages=none -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
        }
        log "guest kernel: apt-get update ($APERTURE_KERNEL_SUITE, private apt state in $A)"
        kapt apt-get -q --error-on=any update >"$CACHE/logs/kernel-apt.log" 2>&1 \
            || { tail -n 20 "$CACHE/logs/kernel-apt.log" >&2; die "could not provision the guest kernel: apt-get update for $APERTURE_KERNEL_SUITE on $MIRROR failed"; }
        if ! kapt apt-cache madison "$APERTURE_KERNEL_PACKAGE" 2>/dev/null | awk -F'|' '{ gsub(/ /, "", $2); print $2 }' | grep -qxF "$APERTURE_KERNEL_DEB_VERSION"; then
            series=$(cut -d. -f1,2 <<<"$kup"); flavour=${KREL#*-}
            printf 'available %s %s kernels in %s:\n' "$series" "$flavour" "$APERTURE_KERNEL_SUITE" >&2
            kapt apt-cache search --names-only "^linux-image-${series//./\\.}\\.[0-9.]+\\+deb[0-9.]+-${flavour}\$" 2>/dev/null \
                | while read -r p _; do kapt apt-cache madison "$p"; done >&2 || true
            die "could not provision the guest kernel: $APERTURE_KERNEL_PACKAGE=$APERTURE_KERNEL_DEB_VERSION is not in $APERTURE_KERNEL_SUITE on $MIRROR; update scripts/versions.env"
        fi
        log "guest kernel: downloading $APERTURE_KERNEL_PACKAGE=$APERTURE_KERNEL_DEB_VERSION"
        new_tmp T .build-kdeb
        ( cd "$T" && kapt apt-get -q download "$APERTURE_KERNEL_PACKAGE=$APERTURE_KERNEL_DEB_VERSION" ) >>"$CACHE/logs/kernel-apt.log" 2>&1 \
            || { tail -n 20 "$CACHE/logs/kernel-apt.log" >&2; die "could not provision the guest kernel: download of $APERTURE_KERNEL_PACKAGE=$APERTURE_KERNEL_DEB_VERSION failed"; }
        mv -f "$T"/*.deb "$KDEB"
    fi
    log "guest kernel: extracting $(basename "$KDEB")"
    new_tmp T .build-guest
    dpkg-deb -x "$KDEB" "$T/x"
    out="$T/guest"; mkdir -p "$out/modules"
    vmlinuz="$T/x/boot/vmlinuz-$KREL"; config="$T/x/boot/config-$KREL"
    [[ -s "$vmlinuz" && -s "$config" ]] || die "could not provision the guest kernel: $KDEB has no boot/vmlinuz-$KREL or boot/config-$KREL (is APERTURE_KERNEL_RELEASE right?)"
    MROOT=
    for m in "$T/x/lib/modules/$KREL" "$T/x/usr/lib/modules/$KREL"; do [[ -d "$m" ]] && MROOT="$m"; done
    [[ -n "$MROOT" ]] || die "could not provision the guest kernel: $KDEB has no lib/modules/$KREL"

    # Required kernel configuration.
    cfg() { sed -n "s/^CONFIG_$1=//p" "$config"; }
    for req in VIRTIO_IOMMU:my ACPI_VIOT:y VIRTIO_PCI:my VIRTIO_BLK:my HW_RANDOM_VIRTIO:my PVH:y DEVTMPFS:y SERIAL_8250_CONSOLE:y; do
        opt=${req%%:*} ok=${req#*:} val=$(cfg "${req%%:*}")
        [[ -n "$val" && "$ok" == *"$val"* ]] || die "could not provision the guest kernel: $KREL has CONFIG_$opt=${val:-unset} (need one of: $ok, where m=module y=built-in); pick another kernel in scripts/versions.env"
    done

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
    [[ "$(od -An -c -N4 "$out/vmlinux" | tr -d ' ')" == '177ELF' ]] || die "could not provision the guest kernel: extracted vmlinux is not an ELF file"

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
    echo "$kstamp" >"$out/.stamp"
    log "guest kernel: $KREL; modules (load order): ${ORDER[*]}; built in: ${BUILTIN_WANTED[*]:-none}"

    if [[ -e "$GDIR" ]]; then OLD=$(mktemp -u "$CACHE/.old-guest.XXXXXX"); mv "$GDIR" "$OLD"; else OLD=; fi
    mv "$out" "$GDIR"
    if [[ -n "$OLD" ]]; then safe_rm_tree "$OLD"; fi
fi

# ---------------------------------------------------------------------------------------
# 5. Summary
# ---------------------------------------------------------------------------------------
[[ -n "${QEMU_VERSION:-}" ]] || die "internal: QEMU version unknown"
ENVOUT="$CACHE/env"
cat >"$ENVOUT.tmp" <<EOF
APERTURE_CACHE=$CACHE
APERTURE_QEMU=$QEMU_WRAPPER
APERTURE_QEMU_VERSION=$QEMU_VERSION
APERTURE_KERNEL=$GDIR/vmlinuz
APERTURE_KERNEL_PVH=$GDIR/vmlinux
APERTURE_KERNEL_RELEASE=$(cat "$GDIR/kernel-version")
APERTURE_MODULES=$GDIR/modules
APERTURE_BUSYBOX=$BUSYBOX
EOF
mv -f "$ENVOUT.tmp" "$ENVOUT"
log "done in $(elapsed); summary also in $ENVOUT"
cat "$ENVOUT"
