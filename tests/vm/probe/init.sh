#!/bin/busybox sh
# /init of `tests/vm/run.sh --probe`: mount, load the virtio modules, run the probe, power off.
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
for m in $(tr ' ' '\n' </proc/cmdline | sed -n 's/^agentd.modules=//p' | tr ',' ' '); do
    insmod "/lib/modules/agentd/$m.ko"
done
port=
while [ -z "$port" ]; do
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat "$d/name" 2>/dev/null)" = agent ] && [ -e "/dev/${d##*/}" ] && port=/dev/${d##*/}
    done
    [ -n "$port" ] || sleep 0.05
done
echo "probe: port $port up at $(cut -d' ' -f1 /proc/uptime) s"
vport_probe "$port"
echo "probe: done"
poweroff -f
