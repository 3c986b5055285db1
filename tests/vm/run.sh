#!/usr/bin/env bash
# tests/vm/run.sh: boot agentd as PID 1 of a QEMU microVM and test it end to end.
#
#   tests/vm/run.sh            build, boot, run the e2e suite (tests/vm/main.rs), power off
#   tests/vm/run.sh --shell    build, boot, and open an interactive shell in the VM
#                              (agentctl --connect unix:SOCK exec -it -- sh); the VM is
#                              powered off when the shell ends
#   tests/vm/run.sh --probe    boot a small C program as /init that traces what poll and
#                              epoll report on the virtio port while a host connects,
#                              disconnects and reconnects (docs/VM.md); needs gcc
#   tests/vm/run.sh --boot     build and boot, print the socket path, and wait until the VM
#                              powers off (drive it yourself: agentctl --connect unix:SOCK ...)
#   tests/vm/run.sh --rootfs debian
#                              build (cached) a minimal Debian root with Python 3 as an ext4
#                              image and boot it with agentd switching root into it (read-write,
#                              then read-only under a tmpfs overlay); tests/vm/rootfs.bash
#   tests/vm/run.sh --help
#
# The test mode boots the VM once per transport for the e2e suite (the virtio-console port,
# then vsock through vhost-device-vsock's hybrid socket), a second time for busybox
# poweroff, and a fourth time for the snapshot/restore test (saved with QMP migrate to a
# file, restored by a new QEMU with -incoming); a VM without its port and one whose agent
# panics on purpose boot beside them.
#
# Environment: AGENTD_VM_ACCEL (kvm|tcg, default: kvm only when real KVM is usable),
# AGENTD_VM_MEM (512M), AGENTD_VM_SMP (1), AGENTD_VM_CACHE (tests/vm/cache),
# AGENTD_VM_APPEND (extra kernel command line, e.g. agentd.log=debug),
# AGENTD_VM_KEEP=1 (keep the work folder with console.log even on success),
# AGENTD_VM_TRANSPORTS (the transports of the e2e suite: "console vsock", the default, or
# one of them), AGENTD_VM_FILTER (development: only the e2e tests whose names contain one
# of these words, plus t99 which powers the VM off), AGENTD_VM_RESTORE=0 (skip the
# snapshot/restore phase).
#
# It installs what it lacks (qemu-system-x86, cpio, busybox-static, binutils, python3) with apt-get,
# vhost-device-vsock with cargo install --locked, downloads
# and caches a stock Debian cloud kernel, builds a static agentd and an initramfs, and always
# stops QEMU on the way out. Exit status: 0 when everything passed.
set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${AGENTD_VM_CACHE:-$HERE/cache}
MEM=${AGENTD_VM_MEM:-512M}
SMP=${AGENTD_VM_SMP:-1}
EXTRA_APPEND=${AGENTD_VM_APPEND:-}
# Debian's kernels have the virtio drivers as modules; the agent loads these, in this order.
# The vsock ones (for the vsock boot; loaded on every boot, they cost little).
MODULES=(virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_mmio virtio_console
    vsock vmw_vsock_virtio_transport_common vmw_vsock_virtio_transport)
PORT_NAME=agent
VSOCK_PORT=1024 # the guest port of the vsock boot (agentd.port=vsock:1024)
GUEST_CID=3
BOOT_TIMEOUT=60     # seconds for the VM to come up (READY) under TCG
SUITE_TIMEOUT=240   # seconds for the whole e2e suite
POWEROFF_TIMEOUT=30 # seconds for QEMU to exit after SHUTDOWN

TRANSPORTS=${AGENTD_VM_TRANSPORTS:-console vsock}
read -r -a FILTER <<<"${AGENTD_VM_FILTER:-}"
[[ ${#FILTER[@]} == 0 ]] || FILTER+=(t99_)

MODE=test
for arg in "$@"; do
    case "$arg" in
        --shell) MODE=shell ;;
        --probe) MODE=probe ;;
        --boot) MODE=boot ;;
        --rootfs) MODE=rootfs ROOTFS_KIND=debian ;;
        --rootfs=*) MODE=rootfs ROOTFS_KIND=${arg#--rootfs=} ;;
        debian) [[ $MODE == rootfs ]] || { echo "run.sh: unknown argument $arg (try --help)" >&2; exit 2; } ;;
        -h | --help)
            sed -n '2,/^set -/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "run.sh: unknown argument $arg (try --help)" >&2
            exit 2
            ;;
    esac
done

log() { printf '[vm %5ss] %s\n' "$SECONDS" "$*" >&2; }
die() {
    log "FAILED: $*"
    exit 1
}

# --- work folder and cleanup on every path ----------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/agentd-vm.XXXXXX")
SOCK=$WORK/agent.sock
CONSOLE=$WORK/console.log
QEMU_PID=
FATAL_PID= # the VM of the fatal-error check (no port), run beside the suite
PANIC_PID= # the VM of the panic check (agentd.test_panic=1), run beside the second boot
QEMU_RC=
VHOST_PID= # vhost-device-vsock of the vsock boot
RESTORE_STATE= # the restore test's notes from before the snapshot
SUITE_PID=
STATUS=1

# Stops the QEMU whose pid is in the variable named $1, if it runs.
stop_pid() {
    local -n pid=$1
    [[ -n $pid ]] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
    pid=
}
stop_qemu() {
    if [[ -n $SUITE_PID ]]; then
        kill -TERM "$SUITE_PID" 2>/dev/null || true
        wait "$SUITE_PID" 2>/dev/null || true
        SUITE_PID=
    fi
    stop_pid QEMU_PID
    stop_pid FATAL_PID
    stop_pid PANIC_PID
    stop_pid VHOST_PID
}

cleanup() {
    local rc=$?
    [[ $STATUS == 0 ]] || STATUS=$rc
    stop_qemu
    if [[ $STATUS != 0 || ${AGENTD_VM_KEEP:-0} == 1 ]]; then
        if [[ -s $CONSOLE ]]; then
            log "last lines of the VM console ($CONSOLE):"
            tail -n 40 "$CONSOLE" | sed 's/^/    | /' >&2
        fi
        log "work folder kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'log "command failed (line $LINENO): $BASH_COMMAND"' ERR
trap 'log interrupted; exit 130' INT
trap 'log terminated; exit 143' TERM

# --- packages ---------------------------------------------------------------------------
APT_UPDATED=0
apt_update_once() {
    if [[ $APT_UPDATED == 0 ]]; then
        log "apt-get update"
        apt-get update -qq >&2
        APT_UPDATED=1
    fi
}

ensure_packages() {
    local missing=()
    command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
    command -v cpio >/dev/null || missing+=(cpio)
    # The initramfs has no libc: only the static busybox will do.
    dpkg -s busybox-static >/dev/null 2>&1 || missing+=(busybox-static)
    # readelf, for the check that agentd is static (the Rust build needs binutils' ld anyway).
    command -v readelf >/dev/null || missing+=(binutils)
    # The restore phase's QMP client (tests/vm/qmp.py).
    command -v python3 >/dev/null || missing+=(python3)
    [[ ${#missing[@]} == 0 ]] && return 0
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them"
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

# vhost-device-vsock (rust-vmm): the vsock device of the vsock boot, a vhost-user
# backend that gives the host a Firecracker-style hybrid vsock (a Unix socket and
# `CONNECT PORT`). Built from crates.io when absent (a few minutes, niced).
VHOST_VSOCK=
ensure_vhost_vsock() {
    VHOST_VSOCK=$(command -v vhost-device-vsock || true)
    [[ -n $VHOST_VSOCK ]] || VHOST_VSOCK=${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock
    [[ -x $VHOST_VSOCK ]] && return 0
    log "installing vhost-device-vsock (cargo install --locked; takes minutes)"
    nice -n 10 cargo install -q vhost-device-vsock --locked >&2 ||
        die "cargo install vhost-device-vsock --locked failed"
    VHOST_VSOCK=${CARGO_HOME:-$HOME/.cargo}/bin/vhost-device-vsock
    [[ -x $VHOST_VSOCK ]] || die "vhost-device-vsock is not in ${CARGO_HOME:-$HOME/.cargo}/bin after cargo install"
}

# --- kernel -----------------------------------------------------------------------------
# A stock Debian cloud kernel, the package that linux-image-cloud-amd64 depends on,
# unpacked into $CACHE/kernel (git-ignored) and reused on later runs.
KERNEL=
MODDIR=
ensure_kernel() {
    local dir=$CACHE/kernel
    KERNEL=
    if [[ -d $dir/boot ]]; then
        KERNEL=$(find "$dir/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n 1)
    fi
    if [[ -z $KERNEL ]]; then
        local pkg
        pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
        if [[ -z $pkg ]]; then
            apt_update_once
            pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
        fi
        [[ -n $pkg ]] || die "cannot find the package that linux-image-cloud-amd64 depends on"
        log "downloading kernel $pkg"
        local dl=$CACHE/download
        rm -rf "$dl" "$dir"
        mkdir -p "$dl"
        (cd "$dl" && apt-get download -q "$pkg" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) || true
        local deb
        deb=$(find "$dl" -maxdepth 1 -name '*.deb' | head -n 1)
        [[ -n $deb ]] || die "apt-get download $pkg gave no .deb"
        dpkg-deb -x "$deb" "$dir.tmp"
        mv "$dir.tmp" "$dir"
        rm -rf "$dl"
        KERNEL=$(find "$dir/boot" -maxdepth 1 -name 'vmlinuz-*' | sort | tail -n 1)
        [[ -n $KERNEL ]] || die "no vmlinuz in $pkg"
    fi
    MODDIR=$(find "$dir/lib/modules" -mindepth 1 -maxdepth 1 -type d | sort | tail -n 1)
    [[ -n $MODDIR ]] || die "no modules in $dir"
    log "kernel: ${KERNEL#"$CACHE"/}"
}

# --- accelerator ------------------------------------------------------------------------
# Real KVM only: /dev/kvm writable, not the nested PVM flavour (unusable for a normal guest
# kernel), and hardware virtualisation in the CPU flags. Otherwise TCG.
choose_accel() {
    if [[ -n ${AGENTD_VM_ACCEL:-} ]]; then
        ACCEL=$AGENTD_VM_ACCEL
    elif [[ -w /dev/kvm && ! -e /sys/module/kvm_pvm ]] && grep -qwE 'vmx|svm' /proc/cpuinfo; then
        ACCEL=kvm
    else
        ACCEL=tcg
    fi
    CPU_ARGS=()
    [[ $ACCEL == kvm ]] && CPU_ARGS=(-cpu host)
    log "accelerator: $ACCEL"
}

# --- builds -----------------------------------------------------------------------------
STATIC_TARGET=x86_64-unknown-linux-gnu
AGENTD_STATIC=$ROOT/target/static/$STATIC_TARGET/release/agentd
AGENTCTL=$ROOT/target/ci/agentctl

build_agentd_static() {
    log "building static agentd (target/static)"
    (cd "$ROOT" && RUSTFLAGS='-C target-feature=+crt-static' nice -n 10 cargo build -q --release \
        --target "$STATIC_TARGET" --target-dir target/static --bin agentd)
    # A static-pie ELF has no interpreter and needs no shared library: it runs with no
    # libc in the initramfs. A readelf that fails or prints no program headers fails
    # the check (it must not pass for want of a tool).
    local headers dynamic
    headers=$(LC_ALL=C readelf -lW "$AGENTD_STATIC") || die "readelf -l $AGENTD_STATIC failed"
    dynamic=$(LC_ALL=C readelf -dW "$AGENTD_STATIC") || die "readelf -d $AGENTD_STATIC failed"
    grep -q '^Program Headers:' <<<"$headers" || die "readelf -l printed no program headers"
    if grep -q 'Requesting program interpreter' <<<"$headers"; then
        die "$AGENTD_STATIC is dynamically linked (it has an INTERP header)"
    fi
    if grep -q '(NEEDED)' <<<"$dynamic"; then
        die "$AGENTD_STATIC needs shared libraries: $(grep '(NEEDED)' <<<"$dynamic" | tr -s ' ')"
    fi
}

build_host_tools() {
    log "building agentctl (the ci profile, as the tests)"
    (cd "$ROOT" && nice -n 10 cargo build -q --profile ci --bin agentctl)
}

# --- initramfs --------------------------------------------------------------------------
# Prints one entry without data of a newc cpio archive (the format the kernel unpacks):
# newc_entry NAME MODE(octal, with the file type) RDEV_MAJOR RDEV_MINOR INODE. Used for
# /dev/console, which `mknod` can only make as root; written this way the initramfs has
# the node whoever builds it.
newc_entry() {
    local name=$1 mode=$2 rmaj=$3 rmin=$4 ino=$5
    local namesize=$((${#name} + 1))
    # magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor,
    # rdevminor, namesize, check.
    printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
        "$ino" "$((8#$mode))" 0 0 1 0 0 0 0 "$rmaj" "$rmin" "$namesize" 0
    printf '%s\0' "$name"
    # The header (110 bytes) and the name are padded to a multiple of 4 bytes.
    head -c $(((4 - (110 + namesize) % 4) % 4)) /dev/zero
}

# /init (the given program), busybox with its applet links, the virtio modules
# (decompressed: finit_module gets them without flags), /dev/console, /etc/passwd and group.
build_initramfs() {
    local init=$1 out=$2
    shift 2
    local root=$WORK/initramfs
    rm -rf "$root"
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,root,etc,lib/modules/agentd}
    chmod 1777 "$root/tmp"
    chmod 700 "$root/root"
    cp "$init" "$root/init"
    chmod 755 "$root/init"
    cp /bin/busybox "$root/bin/busybox"
    local extra
    for extra in "$@"; do
        cp "$extra" "$root/bin/"
    done
    local applet
    while read -r applet; do
        [[ -e $root/$applet || $applet == bin/busybox ]] && continue
        mkdir -p "$root/$(dirname "$applet")"
        ln -s /bin/busybox "$root/$applet"
    done < <(/bin/busybox --list-full)
    local m f
    for m in "${MODULES[@]}"; do
        f=$(find "$MODDIR" -name "$m.ko" -o -name "$m.ko.xz" -o -name "$m.ko.zst" -o -name "$m.ko.gz" | head -n 1)
        [[ -n $f ]] || die "module $m not found under $MODDIR"
        case "$f" in
            *.ko) cp "$f" "$root/lib/modules/agentd/$m.ko" ;;
            *.ko.xz) xz -dc "$f" >"$root/lib/modules/agentd/$m.ko" ;;
            *.ko.zst) zstd -qdc "$f" >"$root/lib/modules/agentd/$m.ko" ;;
            *.ko.gz) gzip -dc "$f" >"$root/lib/modules/agentd/$m.ko" ;;
        esac
    done
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' >"$root/etc/passwd"
    printf 'root:x:0:\ntty:x:5:\nnogroup:x:65534:\n' >"$root/etc/group"
    # The kernel opens /dev/console for init's stdin, stdout and stderr before anything
    # is mounted (its built-in initramfs has the node too; this is for certainty). The
    # node comes first in the archive, written by hand (newc_entry), so no root is needed;
    # cpio's own entries (its "./dev" included) follow, ending with its trailer.
    {
        newc_entry dev 040755 0 0 900001
        newc_entry dev/console 020600 5 1 900002
        (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet)
    } | gzip -1 >"$out"
    local listing
    listing=$(gzip -dc "$out" | LC_ALL=C cpio -itv --quiet 2>&1) || die "cpio cannot list $out"
    grep -qE '^crw------- +1 +(root|0) +(root|0) +5, +1 .* dev/console$' <<<"$listing" ||
        die "the initramfs has no /dev/console node (c 5 1): $(grep console <<<"$listing")"
    grep -qE ' (\./)?init$' <<<"$listing" || die "the initramfs has no /init after the console node"
    log "initramfs: $(du -h "$out" | cut -f1)"
}

# --- QEMU -------------------------------------------------------------------------------
QEMU_T0_MS=
# The transport of the next start_qemu: console (the virtio-console port only) or vsock
# (also a vhost-user-vsock device, and agentd.port=vsock:$VSOCK_PORT).
TRANSPORT=console
QEMU_EXTRA=() # more QEMU arguments for the next start_qemu (the restore test's, a root disk)
VHOST_SOCK=
VSOCK_UDS=
# Starts vhost-device-vsock for the next VM (VHOST_PID, VHOST_SOCK, VSOCK_UDS) and waits
# for its vhost-user socket, which QEMU connects to.
start_vhost_vsock() {
    VHOST_SOCK=$WORK/vhost.sock
    VSOCK_UDS=$WORK/vsock.sock
    rm -f "$VHOST_SOCK" "$VSOCK_UDS"
    "$VHOST_VSOCK" --vm "guest-cid=$GUEST_CID,socket=$VHOST_SOCK,uds-path=$VSOCK_UDS" \
        </dev/null >>"$WORK/vhost-vsock.log" 2>&1 &
    VHOST_PID=$!
    for _ in $(seq 100); do
        [[ -S $VHOST_SOCK ]] && return 0
        kill -0 "$VHOST_PID" 2>/dev/null || break
        sleep 0.05
    done
    cat "$WORK/vhost-vsock.log" >&2 || true
    die "vhost-device-vsock did not create $VHOST_SOCK"
}

# Starts QEMU in the background: start_qemu INITRD SOCK CONSOLE [EXTRA_APPEND]; sets
# STARTED_PID. With TRANSPORT=vsock it also starts vhost-device-vsock.
STARTED_PID=
start_qemu() {
    local initrd=$1 sock=$2 console=$3 extra=${4:-}
    local append="console=ttyS0 quiet panic=-1 printk.devkmsg=on"
    append+=" agentd.modules=$(
        IFS=,
        echo "${MODULES[*]}"
    )"
    append+=" agentd.port=$PORT_NAME agentd.hostname=agentd-vm"
    local vsock=()
    if [[ $TRANSPORT == vsock ]]; then
        start_vhost_vsock
        # vhost-user needs the guest's memory shared with the backend.
        vsock=(-object "memory-backend-memfd,id=mem,size=$MEM,share=on" -numa node,memdev=mem
            -chardev "socket,id=vsk,path=$VHOST_SOCK" -device vhost-user-vsock-pci,chardev=vsk)
        # A later option wins: the agent listens on vsock, not on the console port.
        append+=" agentd.port=vsock:$VSOCK_PORT"
    fi
    [[ -n $EXTRA_APPEND ]] && append+=" $EXTRA_APPEND"
    [[ -n $extra ]] && append+=" $extra"
    rm -f "$sock"
    : >"$console"
    qemu-system-x86_64 \
        -M q35 -accel "$ACCEL" "${CPU_ARGS[@]}" -m "$MEM" -smp "$SMP" \
        -nodefaults -no-user-config -display none -no-reboot \
        -kernel "$KERNEL" -initrd "$initrd" -append "$append" \
        -serial "file:$console" \
        -device virtio-serial-pci \
        -chardev "socket,id=agent0,path=$sock,server=on,wait=off" \
        -device "virtserialport,chardev=agent0,name=$PORT_NAME" \
        "${vsock[@]}" "${QEMU_EXTRA[@]}" \
        </dev/null >>"$WORK/qemu.out" 2>&1 &
    STARTED_PID=$!
}

# Boots the VM the tests talk to (QEMU_PID, SOCK, CONSOLE).
boot_vm() {
    QEMU_T0_MS=$(date +%s%3N)
    start_qemu "$1" "$SOCK" "$CONSOLE"
    QEMU_PID=$STARTED_PID
    log "QEMU started (pid $QEMU_PID, $MEM, $SMP vCPU), console: $CONSOLE"
    # The socket shows up as soon as QEMU has parsed its options.
    for _ in $(seq 100); do
        [[ -S $SOCK ]] && return 0
        kill -0 "$QEMU_PID" 2>/dev/null || break
        sleep 0.05
    done
    cat "$WORK/qemu.out" >&2 || true
    die "QEMU did not create $SOCK"
}

# Waits for the agent's READY (agentctl ping), then keeps the gap a host must leave
# before the next host connects (docs/VM.md).
wait_ready() {
    local deadline=$((SECONDS + BOOT_TIMEOUT))
    until "$AGENTCTL" --connect "unix:$SOCK" ping -c 1 >/dev/null 2>&1; do
        kill -0 "$QEMU_PID" 2>/dev/null || die "QEMU exited during boot"
        ((SECONDS < deadline)) || die "no READY within ${BOOT_TIMEOUT}s"
        sleep 0.5
    done
    sleep 0.1
    log "agent ready $(($(date +%s%3N) - QEMU_T0_MS)) ms after QEMU started"
}

# Waits up to $1 seconds for QEMU to exit; sets QEMU_RC. Fails on timeout.
wait_qemu_exit() {
    local timeout=$1 i
    for ((i = 0; i < timeout * 10; i++)); do
        kill -0 "$QEMU_PID" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$QEMU_PID" 2>/dev/null; then
        die "QEMU still running ${timeout}s after power-off was requested"
    fi
    QEMU_RC=0
    wait "$QEMU_PID" || QEMU_RC=$?
    QEMU_PID=
}

check_powered_off() {
    wait_qemu_exit "$POWEROFF_TIMEOUT"
    [[ $QEMU_RC == 0 ]] || die "QEMU exited with status $QEMU_RC (expected 0 after power-off)"
    grep -q 'reboot: Power down' "$CONSOLE" || die "the console shows no 'reboot: Power down'"
    log "QEMU exited 0 and the console shows the power-down"
}

# Waits for a VM that must power off by itself (its QEMU pid in the variable named $1)
# and checks that QEMU exited 0 and that its console ($2) shows the power-down, each
# extended pattern of $4... and no kernel panic; $3 names the check in messages.
check_vm_powers_off() {
    local -n vm_pid=$1
    local console=$2 what=$3 i rc=0 pattern
    shift 3
    for ((i = 0; i < 900; i++)); do
        kill -0 "$vm_pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -0 "$vm_pid" 2>/dev/null && die "$what: the VM did not power off within 90 s"
    wait "$vm_pid" || rc=$?
    vm_pid=
    [[ $rc == 0 ]] || die "$what: QEMU exited with status $rc"
    for pattern in "$@"; do
        grep -qE "$pattern" "$console" || die "$what: the console ($console) shows no '$pattern'"
    done
    grep -q 'reboot: Power down' "$console" || die "$what: the console shows no power-down"
    # With panic=-1 and -no-reboot a kernel panic ("Attempted to kill init!") also ends
    # QEMU with status 0: only the console tells the two apart.
    if grep -qE 'Kernel panic|Attempted to kill init' "$console"; then
        die "$what: the kernel panicked ($console)"
    fi
}

# The fatal-error VM: QEMU exits 0 and the console shows the fatal error and the power-down.
check_fatal_powers_off() {
    check_vm_powers_off FATAL_PID "$WORK/console-fatal.log" "no port" \
        'fatal: no virtio-console port named "nope"'
    log "no port: fatal error logged and the VM powered off"
}

# The panic VM (agentd.test_panic=1): the panic hook logs the panic and powers off.
check_panic_powers_off() {
    check_vm_powers_off PANIC_PID "$WORK/console-panic.log" "panic" \
        'PID 1 panicked: .*agentd.test_panic=1: deliberate panic'
    log "panic: the panic hook logged the panic and powered the VM off"
}

# --- snapshot and restore ---------------------------------------------------------------
QMP_SOCK=
RESTORE_PAUSE=4 # seconds between the save and the restore: the skew the guest clock gets
qmp() { python3 "$HERE/qmp.py" "$QMP_SOCK" "$@"; }

# Waits for the QMP socket of the running QEMU.
wait_qmp() {
    for _ in $(seq 100); do
        [[ -S $QMP_SOCK ]] && return 0
        kill -0 "$QEMU_PID" 2>/dev/null || break
        sleep 0.05
    done
    die "QEMU did not create its QMP socket $QMP_SOCK"
}

# Saves the running VM to $1 (stop, migrate to "exec:cat > FILE", wait until the
# migration completed) and quits QEMU.
save_vm() {
    local file=$1 status i
    qmp stop >/dev/null || die "QMP stop failed"
    qmp migrate "{\"uri\": \"exec:cat > $file\"}" >/dev/null || die "QMP migrate failed"
    for ((i = 0; i < 600; i++)); do
        status=$(qmp query-migrate) || die "QMP query-migrate failed"
        case "$status" in
            *'"status": "completed"'*) break ;;
            *'"status": "failed"'* | *'"status": "cancelled"'*) die "the migration to $file failed: $status" ;;
        esac
        sleep 0.1
    done
    [[ $status == *'"status": "completed"'* ]] || die "the migration to $file did not complete in 60 s: $status"
    log "VM saved to $file ($(du -h "$file" | cut -f1)): $(sed 's/.*"total-time": \([0-9]*\).*/\1/' <<<"$status") ms"
    qmp quit >/dev/null || true
    wait_qemu_exit 30
}

# The restore test: a VM with a VM generation ID device boots; restore_1_ starts a
# detached session and notes what it saw; the VM is saved to a file and QEMU quits;
# after RESTORE_PAUSE seconds a new QEMU (the same devices) restores it with -incoming;
# restore_2_ reconnects and checks the session, the clock and the restore counter, and
# shuts the VM down.
run_restore() {
    local bin=$1 state=$WORK/vm.state guid1 guid2 status
    TRANSPORT=console
    QMP_SOCK=$WORK/qmp.sock
    QEMU_EXTRA=(-device vmgenid,guid=auto -qmp "unix:$QMP_SOCK,server=on,wait=off")
    rm -f "$QMP_SOCK"
    boot_vm "$WORK/initramfs.cpio.gz"
    wait_qmp
    log "restore test: before the snapshot"
    RESTORE_STATE=$WORK/restore.env
    suite "$bin" restore_1_
    guid1=$(qmp query-vm-generation-id) || die "QMP query-vm-generation-id failed"
    save_vm "$state"
    log "VM saved; restoring it in ${RESTORE_PAUSE}s"
    sleep "$RESTORE_PAUSE"
    rm -f "$QMP_SOCK"
    QEMU_EXTRA+=(-incoming "exec:cat $state")
    boot_vm "$WORK/initramfs.cpio.gz"
    wait_qmp
    local i
    for ((i = 0; i < 600; i++)); do
        status=$(qmp query-status) || die "QMP query-status failed"
        # The source was stopped before it was saved: the restored VM waits paused.
        [[ $status == *'"status": "paused"'* || $status == *'"status": "running"'* ]] && break
        sleep 0.1
    done
    [[ $status == *'"status": "paused"'* ]] && { qmp cont >/dev/null || die "QMP cont failed"; }
    status=$(qmp query-status)
    [[ $status == *'"status": "running"'* ]] || die "the restored VM does not run: $status"
    guid2=$(qmp query-vm-generation-id) || die "QMP query-vm-generation-id failed"
    log "VM restored (vmgenid $guid1 -> $guid2)"
    QEMU_EXTRA=()
    log "restore test: after the restore"
    VMGENID_BEFORE=$guid1 VMGENID_AFTER=$guid2 suite "$bin" restore_2_
    check_powered_off
    mv "$CONSOLE" "$WORK/console-restore.log"
    RESTORE_STATE=
}

# --- modes ------------------------------------------------------------------------------
# Runs the e2e binary $1 against the running VM, with libtest arguments $2...
suite() {
    local bin=$1 rc=0
    shift
    # In the background, so that a signal to this script is handled at once (bash
    # defers traps while a foreground command runs); cleanup stops it.
    AGENTD_VM_SOCK=$SOCK AGENTD_VM_T0_MS=$QEMU_T0_MS AGENTD_VM_AGENTCTL=$AGENTCTL \
        AGENTD_VM_CONSOLE=$CONSOLE AGENTD_VM_TRANSPORT=$TRANSPORT \
        AGENTD_VM_VSOCK_UDS=$VSOCK_UDS AGENTD_VM_VSOCK_PORT=$VSOCK_PORT \
        AGENTD_VM_RESTORE_STATE=$RESTORE_STATE AGENTD_VM_VMGENID_BEFORE=${VMGENID_BEFORE:-} \
        AGENTD_VM_VMGENID_AFTER=${VMGENID_AFTER:-} \
        timeout -k 5 "$SUITE_TIMEOUT" \
        "$bin" --ignored --test-threads=1 --nocapture "$@" </dev/null &
    SUITE_PID=$!
    wait "$SUITE_PID" || rc=$?
    SUITE_PID=
    [[ $rc == 0 ]] || die "e2e suite failed (status $rc)"
}

run_suite() {
    build_agentd_static
    build_host_tools
    log "building the e2e suite"
    local bin
    # The artifact of the test target "vm" (a cold build also lists the bins it needs).
    bin=$(cd "$ROOT" && nice -n 10 cargo test -q --profile ci --test vm --no-run --message-format=json 2>/dev/null |
        grep '"kind":\["test"\]' | grep '"name":"vm"' |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1) || true
    [[ -x $bin ]] || die "cannot build the e2e suite (cargo test --profile ci --test vm --no-run)"
    build_initramfs "$AGENTD_STATIC" "$WORK/initramfs.cpio.gz"
    # Beside the suite: a VM whose port never appears (agentd.port=nope). The agent
    # must give up after 30 s, log a fatal error and power off (PID 1 never exits).
    start_qemu "$WORK/initramfs.cpio.gz" "$WORK/fatal.sock" "$WORK/console-fatal.log" agentd.port=nope
    FATAL_PID=$STARTED_PID
    # First boot: everything but the second_boot_ tests; it ends with SHUTDOWN. Over the
    # console port, then the same suite over vsock: agentd.port=vsock:PORT, the host on
    # the hybrid vsock socket of vhost-device-vsock.
    local t
    for t in $TRANSPORTS; do
        case "$t" in
            console | vsock) TRANSPORT=$t ;;
            *) die "AGENTD_VM_TRANSPORTS: unknown transport $t (console or vsock)" ;;
        esac
        boot_vm "$WORK/initramfs.cpio.gz"
        if [[ $t == vsock ]]; then
            log "running the e2e suite over vsock (vhost-device-vsock, hybrid socket $VSOCK_UDS)"
        else
            log "running the e2e suite over the console port (first boot)"
        fi
        suite "$bin" --skip second_boot_ --skip restore_ "${FILTER[@]}"
        check_powered_off
        stop_pid VHOST_PID
        mv "$CONSOLE" "$WORK/console-$t.log"
    done
    TRANSPORT=console
    # Beside the second boot: a VM whose agent panics on purpose right after its boot
    # steps (agentd.test_panic=1, a test hook). The panic hook must log and power off.
    start_qemu "$WORK/initramfs.cpio.gz" "$WORK/panic.sock" "$WORK/console-panic.log" agentd.test_panic=1
    PANIC_PID=$STARTED_PID
    # Second boot: shutdown by busybox poweroff (a signal to PID 1).
    boot_vm "$WORK/initramfs.cpio.gz"
    log "running the e2e suite (second boot)"
    suite "$bin" second_boot_
    check_powered_off
    check_panic_powers_off
    if [[ ${AGENTD_VM_RESTORE:-1} == 1 ]]; then
        run_restore "$bin"
    fi
    check_fatal_powers_off
    STATUS=0
    log "all VM tests passed in ${SECONDS}s"
}

run_shell() {
    build_agentd_static
    build_host_tools
    build_initramfs "$AGENTD_STATIC" "$WORK/initramfs.cpio.gz"
    boot_vm "$WORK/initramfs.cpio.gz"
    wait_ready
    log "connecting: $AGENTCTL --connect unix:$SOCK exec -it -- sh   (exit the shell to power off)"
    local rc=0
    "$AGENTCTL" --connect "unix:$SOCK" exec -it -- sh || rc=$?
    log "shell ended (status $rc); powering the VM off"
    sleep 0.1
    "$AGENTCTL" --connect "unix:$SOCK" shutdown || log "shutdown request failed"
    wait_qemu_exit "$POWEROFF_TIMEOUT"
    log "VM powered off (QEMU status $QEMU_RC)"
    STATUS=0
}

run_probe() {
    command -v gcc >/dev/null || die "--probe needs gcc"
    log "building the poll probe (tests/vm/probe/vport_probe.c, static)"
    gcc -O2 -Wall -static -o "$WORK/vport_probe" "$HERE/probe/vport_probe.c"
    build_initramfs "$HERE/probe/init.sh" "$WORK/initramfs.cpio.gz" "$WORK/vport_probe"
    boot_vm "$WORK/initramfs.cpio.gz"
    python3 "$HERE/probe/host.py" "$SOCK" "$CONSOLE"
    wait_qemu_exit "$POWEROFF_TIMEOUT"
    log "probe trace (from the VM console):"
    grep -a 'probe' "$CONSOLE" >&2 || true
    STATUS=0
}

run_boot() {
    build_agentd_static
    build_host_tools
    build_initramfs "$AGENTD_STATIC" "$WORK/initramfs.cpio.gz"
    boot_vm "$WORK/initramfs.cpio.gz"
    wait_ready
    log "VM is up; connect with: $AGENTCTL --connect unix:$SOCK ...   (waiting for power-off)"
    while kill -0 "$QEMU_PID" 2>/dev/null; do sleep 0.5; done
    QEMU_RC=0
    wait "$QEMU_PID" || QEMU_RC=$?
    QEMU_PID=
    log "QEMU exited with status $QEMU_RC"
    STATUS=$QEMU_RC
}

# shellcheck source=tests/vm/rootfs.bash
source "$HERE/rootfs.bash"

ensure_packages
[[ $MODE == test ]] && ensure_vhost_vsock
ensure_kernel
choose_accel
case "$MODE" in
    rootfs) run_rootfs ;;
    test) run_suite ;;
    shell) run_shell ;;
    probe) run_probe ;;
    boot) run_boot ;;
esac
