# tests/vm/rootfs.bash: `tests/vm/run.sh --rootfs debian`, sourced by run.sh (it uses
# run.sh's kernel, initramfs and QEMU functions).
#
# Builds (and caches under $CACHE, git-ignored) a minimal Debian root with Python 3 from
# Debian's packages (mmdebstrap --variant=minbase --include=python3), installs the static
# agentd in it as /sbin/agentd, packs it as an ext4 image (mkfs.ext4 -d), and boots it
# the way platforms do: agentd as /init of a small initramfs that loads virtio_blk,
# mounts agentd.root=/dev/vda and switches root (docs/VM.md, "Booting a distribution").
# Two layouts, each tested end to end through the virtio port with agentctl:
#   1. root on the block device, read-write: python3 computes and prints; a project
#      uploaded with agentctl cp runs and its results directory is downloaded with
#      agentctl cp; python3 -m http.server in a detached session fetched through
#      agentctl port-forward with urllib; a user of the distribution's /etc/passwd
#      (www-data, with its HOME); READY's mounts; power-off leaves a clean file system
#      (e2fsck -fn);
#   2. the same image read-only under agentd.overlay=tmpfs: writes work, and the image
#      is byte for byte unchanged afterwards.

DEBIAN_SUITE=bookworm
ROOT_MODULES=(virtio_blk overlay)

ensure_rootfs_packages() {
    local missing=()
    command -v mmdebstrap >/dev/null || missing+=(mmdebstrap)
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    [[ ${#missing[@]} == 0 ]] && return 0
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2; then
        apt_update_once
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
    fi
}

# The root's tarball, built once and cached.
ROOTFS_TAR=
ensure_debian_tarball() {
    ROOTFS_TAR=$CACHE/debian-$DEBIAN_SUITE-python3.tar
    [[ -s $ROOTFS_TAR ]] && return 0
    mkdir -p "$CACHE"
    log "building a minimal Debian $DEBIAN_SUITE root with python3 (mmdebstrap, cached in ${ROOTFS_TAR#"$ROOT"/})"
    local t0=$SECONDS
    mmdebstrap --quiet --format=tar --variant=minbase --include=python3 "$DEBIAN_SUITE" "$ROOTFS_TAR.tmp" >&2 ||
        die "mmdebstrap failed"
    mv "$ROOTFS_TAR.tmp" "$ROOTFS_TAR"
    log "Debian root built in $((SECONDS - t0)) s ($(du -h "$ROOTFS_TAR" | cut -f1))"
}

# Unpacks the tarball, adds /sbin/agentd, and packs an ext4 image at $1.
build_root_image() {
    local image=$1 dir=$WORK/rootfs
    rm -rf "$dir"
    mkdir -p "$dir"
    tar -C "$dir" -xf "$ROOTFS_TAR"
    install -m 755 "$AGENTD_STATIC" "$dir/sbin/agentd"
    rm -f "$image"
    mkfs.ext4 -q -F -L agentd-root -d "$dir" "$image" 1G || die "mkfs.ext4 -d failed"
    rm -rf "$dir"
    log "root image: $(du -h --apparent-size "$image" | cut -f1) ($(du -h "$image" | cut -f1) used)"
}

# The file system type of / in /proc/self/mountinfo: the field after the " - " that
# ends the optional fields.
ROOT_FSTYPE='$5 == "/" { for (i = 7; i < NF; i++) if ($i == "-") { print $(i + 1); exit } }'

# agentctl against the running VM.
actl() {
    "$AGENTCTL" --connect "unix:$SOCK" "$@"
}

# expect WHAT EXPECTED ACTUAL
expect() {
    [[ $3 == "$2" ]] || die "$1: expected '$2', got '$3'"
    log "ok: $1"
}

# The tests of the read-write layout.
rootfs_rw_tests() {
    local out
    out=$(actl ping -c 1) || die "ping failed"
    grep -q 'mount /dev/vda on / (ext4): ok' <<<"$out" || die "READY's mounts: $out"
    log "ok: READY's mounts report the root"
    out=$(actl exec -- python3 -c 'import sys; print(6 * 7, sys.version_info[0])')
    expect "python3 computes" "42 3" "$out"
    out=$(actl exec -- awk "$ROOT_FSTYPE" /proc/self/mountinfo)
    expect "/ is the ext4 image" "ext4" "$out"
    out=$(actl exec -- sh -c '. /etc/os-release && echo $ID')
    expect "the distribution's files" "debian" "$out"
    out=$(actl exec -u www-data -- sh -c 'echo $(id -un) $HOME')
    expect "a user of the distribution's /etc/passwd" "www-data /var/www" "$out"
    # A project uploaded with the file operations (agentctl cp), its script run, and
    # its results directory downloaded.
    mkdir -p "$WORK/project/data"
    printf 'import json, pathlib, statistics\nnums = [int(x) for x in pathlib.Path("data/nums.txt").read_text().split()]\npathlib.Path("out").mkdir(exist_ok=True)\npathlib.Path("out/result.json").write_text(json.dumps({"mean": statistics.mean(nums)}))\n' >"$WORK/project/job.py"
    printf '1 2 3 6\n' >"$WORK/project/data/nums.txt"
    actl cp "$WORK/project" :/root/project || die "agentctl cp (upload) failed"
    actl exec -w /root/project -- python3 job.py || die "the uploaded script failed"
    actl cp :/root/project/out "$WORK/out" || die "agentctl cp (download) failed"
    expect "the script's result, downloaded" '{"mean": 3}' "$(cat "$WORK/out/result.json")"
    # python3 -m http.server in a detached session, fetched through agentctl port-forward
    # with Python's urllib on the host.
    actl exec -d --name web -- python3 -m http.server 8000 --bind 127.0.0.1 --directory /root/project/out >/dev/null ||
        die "starting http.server failed"
    # agentctl itself in the background (not the actl function, whose subshell a kill
    # would end without ending agentctl).
    "$AGENTCTL" --connect "unix:$SOCK" port-forward :8000 >"$WORK/forward.out" 2>"$WORK/forward.err" &
    local forward_pid=$! port=
    for _ in $(seq 100); do
        port=$(sed -n 's/^Forwarding from 127.0.0.1:\([0-9]*\) -> 8000$/\1/p' "$WORK/forward.out")
        [[ -n $port ]] && break
        sleep 0.1
    done
    [[ -n $port ]] || die "agentctl port-forward printed no forward: $(cat "$WORK/forward.err")"
    out=$(python3 - "http://127.0.0.1:$port/result.json" <<'PY'
import sys, time, urllib.request
for _ in range(100):
    try:
        print(urllib.request.urlopen(sys.argv[1], timeout=10).read().decode())
        break
    except OSError:
        time.sleep(0.2)
else:
    sys.exit("no answer through the forward")
PY
    ) || die "fetching through the port forward failed"
    kill "$forward_pid" 2>/dev/null || true
    wait "$forward_pid" 2>/dev/null || true
    # The gap a host leaves after another closed the console port (docs/VM.md: a
    # reconnect at once can coalesce with the close, and the agent not see it).
    sleep 0.5
    expect "http.server in the VM, fetched through a port forward" '{"mean": 3}' "$out"
    actl kill web >/dev/null || die "agentctl kill web failed"
    boot_breakdown "root on /dev/vda"
}

# Prints the boot's milestones from the guest's kernel log (seconds since the kernel
# started): /init started, the agent up, the switch done, the first host served.
boot_breakdown() {
    local what=$1 log
    log=$(actl exec -- dmesg) || die "dmesg failed"
    at() { awk -v p="$1" 'index($0, p) { sub(/^\[ */, ""); sub(/\].*/, ""); print; exit }' <<<"$log"; }
    log "boot ($what): /init at $(at 'Run /init') s, agent up at $(at 'as PID 1') s, root switched at $(at 'switched root') s, first host served at $(at 'host connected') s (kernel time; the host polls every 0.5 s)"
}

# The tests of the overlay layout.
rootfs_overlay_tests() {
    local out
    out=$(actl ping -c 1) || die "ping failed"
    grep -q 'mount overlay on / (overlay): ok' <<<"$out" || die "READY's mounts: $out"
    out=$(actl exec -- sh -c 'echo written > /etc/agentd-overlay-test && cat /etc/agentd-overlay-test')
    expect "a write to the overlaid root" "written" "$out"
    out=$(actl exec -- awk "$ROOT_FSTYPE" /proc/self/mountinfo)
    expect "/ is the overlay" "overlay" "$out"
    boot_breakdown "overlay"
}

# Boots the image with kernel command line $2... and runs test function $1.
boot_root() {
    local tests=$1 image=$2
    shift 2
    QEMU_EXTRA=(-drive "file=$image,if=none,id=root0,format=raw" -device virtio-blk-pci,drive=root0)
    EXTRA_APPEND="${BASE_APPEND:-} $*"
    boot_vm "$WORK/initramfs-root.cpio.gz"
    wait_ready
    "$tests"
    actl shutdown || die "shutdown failed"
    check_powered_off
    mv "$CONSOLE" "$WORK/console-$tests.log"
}

run_rootfs() {
    [[ ${ROOTFS_KIND:-} == debian ]] || die "--rootfs takes 'debian' (the only root built here)"
    ensure_rootfs_packages
    build_agentd_static
    build_host_tools
    ensure_debian_tarball
    MODULES+=("${ROOT_MODULES[@]}")
    build_initramfs "$AGENTD_STATIC" "$WORK/initramfs-root.cpio.gz"
    local image=$WORK/root.ext4 before after
    build_root_image "$image"
    BASE_APPEND=$EXTRA_APPEND
    log "layout 1: root on /dev/vda, read-write"
    boot_root rootfs_rw_tests "$image" agentd.root=/dev/vda agentd.rootfstype=ext4
    e2fsck -fn "$image" >"$WORK/e2fsck.log" 2>&1 || die "e2fsck -fn after power-off: $(tail -n 5 "$WORK/e2fsck.log")"
    log "ok: the file system is clean after power-off (e2fsck -fn)"
    log "layout 2: the same image read-only under a tmpfs overlay"
    before=$(sha256sum "$image" | cut -d' ' -f1)
    boot_root rootfs_overlay_tests "$image" agentd.root=/dev/vda agentd.rootflags=ro agentd.overlay=tmpfs
    after=$(sha256sum "$image" | cut -d' ' -f1)
    expect "the image is unchanged after the overlay boot" "$before" "$after"
    STATUS=0
    log "all rootfs tests passed in ${SECONDS}s"
}
