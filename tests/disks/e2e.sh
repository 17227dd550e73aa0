#!/bin/sh
# End-to-end disk tests: run by resources/nested-host (ci/disk-tests starts it) on a host whose
# /dev/kvm boots Linux, with `vmm` on PATH, $GUEST_DIR (kernel, initramfs) and $DISK_DIR holding a
# writable copy of resources/cache/rootfs/chain (base <- mid <- top, qcow2). Four scenarios:
#   1. write: root file system on the qcow2 top of the depth-3 chain, on iothread io0, cache=none;
#      a raw data disk on iothread io1 (cache=none, O_DIRECT writes from the guest); a read-only raw
#      disk on the main loop; a qcow2 data disk on the main loop with cache=writeback and 2 queues.
#      The guest writes files and patterns, syncs, powers off. Then qemu-img check on the overlay and
#      the qcow2 data disk, backing and read-only images byte-identical, the patterns read back on
#      the host.
#   2. read back: the same root now on the main loop with cache=writethrough and the qcow2 data
#      disk on an iothread with cache=directsync; the guest checks the files and the pattern and
#      writes once more; qemu-img check again.
#   3. fio: a 2-vCPU guest runs fio --verify=crc32c at queue depth 32 on a qcow2 disk on an iothread
#      (16 MiB of 4 KiB random writes, each block read back and verified),
#      while QMP (over -qmp tcp:) is asked query-iothreads (thread ids checked against the real
#      threads), query-block and query-blockstats; then system_powerdown presses the ACPI power
#      button and busybox acpid in the guest powers off.
#   4. a full host disk: fio --verify on a qcow2 overlay on a small tmpfs; ENOSPC stops the VM
#      (werror=enospc), the events and run state are QEMU's, space is freed, cont, fio verifies;
#      run under vmm and, for comparison, under QEMU (its stop, events and replies checked; what
#      follows its cont only noted).
#   5. block jobs under a Linux guest running fio --verify, under vmm and under QEMU, the replies,
#      events, chains and resulting images compared (jobs.sh, sourced from $DISK_DIR; alone when
#      $DISK_DIR/only-jobs exists: ci/disk-tests --only-jobs).
#   6. the full Debian 12 guest to systemd's `running`, fio through ext4, systemd's power-off, and
#      a second boot reading the data back (debian.sh, sourced from $DISK_DIR).
# $DISK_DIR/guest-append, if there, holds what to add to the guests' kernel command line.
# Prints "E2E-PASS name" / "E2E-FAIL name" per check, "E2E-TIME" per boot, and a summary line; the
# exit status is the number of failed checks (capped at 100). A guest that resets itself before its
# userspace starts (vmm exits 0, no GUEST-USERSPACE-UP: the nested host's emulated virtualization
# has been seen to triple-fault an early-booting guest) is booted once more, said in an E2E-NOTE
# line with the triple fault vmm logged; nothing reaches the disks before userspace.
set -u
cd "$DISK_DIR" || exit 100
G=$GUEST_DIR
pass=0
fail=0
ok() { echo "E2E-PASS $1"; pass=$((pass + 1)); }
bad() { echo "E2E-FAIL $1"; fail=$((fail + 1)); }
# check NAME COMMAND...: a check passes when COMMAND succeeds.
check() { name=$1; shift; if "$@"; then ok "$name"; else bad "$name"; fi; }
# has LOG TEXT: the console log holds the line TEXT.
has() { grep -q "$2" "$1"; }
# early_reset LOG RC: the boot that wrote LOG ended with RC 0 before userspace; says so.
early_reset() {
  [ "$2" = 0 ] && ! has "$1" GUEST-USERSPACE-UP || return 1
  echo "E2E-NOTE $1: the guest reset before userspace ($(grep -o 'triple fault.*' "$1.debug" | head -1)) after: $(grep -v '^$' "$1" | tail -1); booting again"
}
# boot LOG SECONDS ARGS...: runs vmm ARGS with the console in LOG and its debug log in LOG.debug;
# once more after an early reset. Returns vmm's exit status.
boot() {
  log=$1 limit=$2; shift 2
  timeout "$limit" vmm "$@" -D "$log.debug" < /dev/null > "$log" 2>&1
  rc=$?
  if early_reset "$log" $rc; then
    timeout "$limit" vmm "$@" -D "$log.debug" < /dev/null > "$log" 2>&1
    rc=$?
  fi
  return $rc
}
b64() { printf '%s\n' "$1" | base64 | tr -d '\n'; }
sum() { sha256sum "$1" | cut -d' ' -f1; }
# finish: the summary line; exits with the number of failed checks.
finish() {
  echo "E2E $pass passed, $fail failed"
  [ $fail -gt 100 ] && fail=100
  exit $fail
}
APPEND="console=ttyS0 quiet $(cat guest-append 2>/dev/null)"
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
JOBS_QEMU_ARGS=$DISK_DIR/qemu-baseline.args
. "$DISK_DIR/jobs.sh"
if [ -e "$DISK_DIR/only-jobs" ]; then jobs_all; finish; fi
PATTERN_BYTES=4194304
yes integ-data | head -c $PATTERN_BYTES > pattern
pattern_md5=$(md5sum < pattern | cut -d' ' -f1)

qemu-img create -q -f raw data1.raw 64M
qemu-img create -q -f qcow2 data3.qcow2 64M
head -c 16777216 /dev/urandom > ro.raw
base_sum=$(sum chain/base.qcow2)
mid_sum=$(sum chain/mid.qcow2)
ro_sum=$(sum ro.raw)

# The guest side: name each disk by its serial (dev_SERIAL=/dev/vdX), as the guest sees them.
DISKS='for d in /sys/block/vd*; do s=$(cat $d/serial); echo "GUEST-DISK ${d##*/} serial=$s ro=$(cat $d/ro)"; eval "dev_$s=/dev/${d##*/}"; done'

# ---- boot 1: write -------------------------------------------------------------------------
W=$(b64 "$DISKS
echo hello-iothread > /root/hello
dd if=/dev/urandom of=/root/blob bs=1M count=8 2>/dev/null
md5sum /root/blob > /root/blob.md5
yes integ-data | head -c $PATTERN_BYTES > /tmp/pattern
dd if=/tmp/pattern of=\$dev_data1 bs=1M oflag=direct 2>/dev/null && echo GUEST-DATA1-WRITTEN
dd if=/tmp/pattern of=\$dev_data3 bs=1M conv=fsync 2>/dev/null && echo GUEST-DATA3-WRITTEN
if dd if=/tmp/pattern of=\$dev_ro bs=4096 count=1 2>/dev/null; then echo GUEST-RO-WRITTEN; else echo GUEST-RO-REFUSED; fi
sync
echo GUEST-WRITES-DONE")
start=$(date +%s)
boot boot1.log 400 -m 512M -smp 2 -kernel "$G/bzImage" -initrd "$G/initrd.img" \
  -object iothread,id=io0 -object iothread,id=io1 \
  -drive file=chain/top.qcow2,format=qcow2,if=none,id=root,cache=none \
  -device virtio-blk-device,drive=root,id=vroot,iothread=io0,serial=root \
  -drive file=data1.raw,format=raw,if=none,id=data1,cache=none \
  -device virtio-blk-device,drive=data1,iothread=io1,serial=data1 \
  -drive file=ro.raw,format=raw,if=none,id=ro,readonly=on \
  -device virtio-blk-device,drive=ro,serial=ro \
  -drive file=data3.qcow2,format=qcow2,if=none,id=data3,cache=writeback \
  -device virtio-blk-device,drive=data3,serial=data3,num-queues=2 \
  -append "$APPEND guest.root=/dev/vda guest.sh=$W guest.run=poweroff"
rc=$?
echo "E2E-TIME boot1-write $(($(date +%s) - start)) s rc=$rc"
check boot1-exit-0 [ "$rc" = 0 ]
check boot1-root-on-chain-top has boot1.log "GUEST-ROOT /dev/vda ext4"
check boot1-four-disks [ "$(grep -c '^GUEST-DISK' boot1.log)" = 4 ]
check boot1-ro-disk-is-ro has boot1.log "serial=ro ro=1"
check boot1-data1-written has boot1.log GUEST-DATA1-WRITTEN
check boot1-data3-written has boot1.log GUEST-DATA3-WRITTEN
check boot1-ro-write-refused has boot1.log GUEST-RO-REFUSED
check boot1-guest-done has boot1.log GUEST-WRITES-DONE
check boot1-top-check qemu-img check -q chain/top.qcow2
check boot1-data3-check qemu-img check -q data3.qcow2
check boot1-base-unchanged [ "$(sum chain/base.qcow2)" = "$base_sum" ]
check boot1-mid-unchanged [ "$(sum chain/mid.qcow2)" = "$mid_sum" ]
check boot1-ro-unchanged [ "$(sum ro.raw)" = "$ro_sum" ]
check boot1-data1-pattern [ "$(head -c $PATTERN_BYTES data1.raw | md5sum | cut -d' ' -f1)" = "$pattern_md5" ]
qemu-img convert -f qcow2 -O raw data3.qcow2 data3.raw
check boot1-data3-pattern [ "$(head -c $PATTERN_BYTES data3.raw | md5sum | cut -d' ' -f1)" = "$pattern_md5" ]
rm -f data3.raw
[ "$rc" = 0 ] || tail -40 boot1.log

# ---- boot 2: read back, placements swapped -------------------------------------------------
R=$(b64 "$DISKS
[ \"\$(cat /root/hello)\" = hello-iothread ] && echo GUEST-HELLO-OK
(cd /root && md5sum -c blob.md5 >/dev/null) && echo GUEST-BLOB-OK
[ \"\$(head -1 /etc/layer-top)\" = top ] && [ \"\$(head -1 /etc/layer-mid)\" = mid ] && echo GUEST-LAYERS-OK
[ \"\$(head -c $PATTERN_BYTES \$dev_data3 | md5sum | cut -d' ' -f1)\" = $pattern_md5 ] && echo GUEST-DATA3-OK
echo second-boot > /root/second
sync
echo GUEST-READS-DONE")
start=$(date +%s)
boot boot2.log 400 -m 512M -smp 1 -kernel "$G/bzImage" -initrd "$G/initrd.img" \
  -object iothread,id=io0 \
  -drive file=chain/top.qcow2,format=qcow2,if=none,id=root,cache=writethrough \
  -device virtio-blk-device,drive=root,serial=root \
  -drive file=data3.qcow2,format=qcow2,if=none,id=data3,cache=directsync \
  -device virtio-blk-device,drive=data3,iothread=io0,serial=data3 \
  -append "$APPEND guest.root=/dev/vda guest.sh=$R guest.run=poweroff"
rc=$?
echo "E2E-TIME boot2-read $(($(date +%s) - start)) s rc=$rc"
check boot2-exit-0 [ "$rc" = 0 ]
check boot2-hello has boot2.log GUEST-HELLO-OK
check boot2-blob has boot2.log GUEST-BLOB-OK
check boot2-chain-layers has boot2.log GUEST-LAYERS-OK
check boot2-data3 has boot2.log GUEST-DATA3-OK
check boot2-done has boot2.log GUEST-READS-DONE
check boot2-top-check qemu-img check -q chain/top.qcow2
check boot2-base-unchanged [ "$(sum chain/base.qcow2)" = "$base_sum" ]
check boot2-mid-unchanged [ "$(sum chain/mid.qcow2)" = "$mid_sum" ]
[ "$rc" = 0 ] || tail -40 boot2.log

# ---- boot 3: fio with verification at QD32, QMP, the power button ----------------------------
qemu-img create -q -f qcow2 fio.qcow2 256M
QMP_PORT=4444
# qmp COMMAND...: sends the commands after qmp_capabilities, prints the replies.
qmp() {
  { echo '{"execute":"qmp_capabilities"}'; for c in "$@"; do echo "$c"; done; sleep 2; } |
    nc 127.0.0.1 $QMP_PORT
}
F=$(b64 "fio --name=verify --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 \
--rw=randwrite --bs=4k --size=16M --verify=crc32c --verify_backlog=1024 --group_reporting > /tmp/fio.txt 2>&1
echo GUEST-FIO-RC=\$?
grep -E 'iops|clat \\(|lat \\(|err=|verify' /tmp/fio.txt
echo GUEST-FIO-DONE")
start=$(date +%s)
for attempt in 1 2; do
  timeout 300 vmm -m 1G -smp 2 -kernel "$G/bzImage" -initrd "$G/initrd-fio.img" \
    -object iothread,id=io0 \
    -drive file=fio.qcow2,format=qcow2,if=none,id=fio0,cache=none,aio=io_uring,stats-intervals=10 \
    -device virtio-blk-device,drive=fio0,id=vfio,iothread=io0,serial=fio \
    -qmp tcp:127.0.0.1:$QMP_PORT,server=on,wait=off -D boot3.log.debug \
    -append "$APPEND guest.run=acpid guest.sh=$F" < /dev/null > boot3.log 2>&1 &
  vmm_pid=$!
  i=0
  until has boot3.log GUEST-ACPID || ! kill -0 $vmm_pid 2>/dev/null || [ $i -ge 300 ]; do
    sleep 1; i=$((i + 1))
  done
  has boot3.log GUEST-ACPID || kill -0 $vmm_pid 2>/dev/null && break
  wait $vmm_pid
  rc=$?
  early_reset boot3.log $rc || break
done
qmp '{"execute":"query-iothreads"}' '{"execute":"query-block"}' > qmp1.txt 2>&1
io0_tid=""
for t in /proc/$vmm_pid/task/*; do [ "$(cat "$t/comm")" = io0 ] && io0_tid=${t##*/}; done
check qmp-iothread-thread-id grep -q "\"id\": \"io0\", \"thread-id\": $io0_tid\|\"thread-id\": $io0_tid, .*\"id\": \"io0\"" qmp1.txt
check qmp-query-block grep -q '"device": "fio0"' qmp1.txt
i=0
until has boot3.log GUEST-FIO-DONE || ! kill -0 $vmm_pid 2>/dev/null || [ $i -ge 400 ]; do
  sleep 1; i=$((i + 1))
done
qmp '{"execute":"query-blockstats"}' > qmp2.txt 2>&1
check qmp-blockstats-counted grep -q '"wr_operations": [1-9]' qmp2.txt
qmp '{"execute":"system_powerdown"}' > qmp3.txt 2>&1
# Not yet waited for (running, or a zombie): its status now; else the one the loop above took.
if kill -0 $vmm_pid 2>/dev/null; then wait $vmm_pid; rc=$?; fi
echo "E2E-TIME boot3-fio $(($(date +%s) - start)) s rc=$rc"
check boot3-exit-0 [ "$rc" = 0 ]
check boot3-fio-rc-0 has boot3.log GUEST-FIO-RC=0
check boot3-fio-no-errors has boot3.log "err= 0"
# 16 MiB written, every byte read back by fio's verification (the guest may merge adjacent reads,
# so count bytes, not requests; the kernel's partition scan reads a little more).
read_bytes=$(sed -n 's/.*"rd_bytes": \([0-9]*\).*/\1/p' qmp2.txt | head -1)
check boot3-fio-verified-every-block [ "${read_bytes:-0}" -ge 16777216 ]
check boot3-power-button has boot3.log GUEST-POWER-BUTTON
check boot3-powerdown-event grep -q POWERDOWN qmp3.txt
check boot3-fio-image-check qemu-img check -q fio.qcow2
grep -E "GUEST-FIO|iops|lat \(|clat \(" boot3.log
echo "--- QMP"
cat qmp1.txt qmp2.txt qmp3.txt
has boot3.log GUEST-POWER-BUTTON || tail -60 boot3.log

# ---- boot 4: the host file system fills up under fio --verify; the VM stops; space; cont ------
# The overlay lives on a small tmpfs (cache=writeback: tmpfs has no O_DIRECT) whose free space a
# filler file takes but 3 MiB; fio's 8 MiB of random writes need more, so a write fails with
# ENOSPC and werror's default (enospc) stops the VM: BLOCK_IO_ERROR (action stop, nospace) then
# STOP, query-status io-error, query-block io-status nospace. The filler goes, cont retries the
# kept requests, fio finishes and verifies every block, qemu-img check is clean. The same run
# under QEMU (microvm) shows QEMU's replies beside ours. The VM starts with -S so the event
# listener is connected before the guest runs.
E=$(b64 "fio --name=enospc --filename=/dev/vda --direct=1 --ioengine=libaio --iodepth=32 \
--rw=randwrite --bs=4k --size=8M --verify=crc32c --verify_backlog=1024 --group_reporting > /tmp/fio.txt 2>&1
echo GUEST-FIO-RC=\$?
grep -E 'err=|verify' /tmp/fio.txt
echo GUEST-FIO-DONE")
# all_in FILE TEXT...: FILE holds every TEXT (in any order: QEMU's members come unordered).
all_in() { f=$1; shift; for t in "$@"; do grep -qF "$t" "$f" || return 1; done; }
# qmp_at PORT COMMAND...: as qmp, on PORT.
qmp_at() {
  port=$1; shift
  { echo '{"execute":"qmp_capabilities"}'; for c in "$@"; do echo "$c"; done; sleep 2; } |
    nc 127.0.0.1 "$port"
}
# enospc_boot NAME COMMAND...: the run above with the VMM COMMAND (events on $QMP_PORT, commands
# on $CMD_PORT); its files are NAME.*.
enospc_boot() {
  run=$1; shift
  mkdir -p full && mount -t tmpfs -o size=32m tmpfs full || { bad "$run-tmpfs"; return; }
  qemu-img create -q -f qcow2 full/enospc.qcow2 64M
  dd if=/dev/zero of=full/filler bs=1M 2>/dev/null
  truncate -s $(($(wc -c < full/filler) - 3145728)) full/filler
  echo "E2E-NOTE $run: $(df -k full | tail -1)"
  start=$(date +%s)
  "$@" -kernel "$G/bzImage" -initrd "$G/initrd-fio.img" -S -object iothread,id=io0 \
    -drive file=full/enospc.qcow2,format=qcow2,if=none,id=e0,cache=writeback \
    -device virtio-blk-device,drive=e0,id=ve0,iothread=io0,serial=enospc \
    -qmp tcp:127.0.0.1:$QMP_PORT,server=on,wait=off -D "$run.log.debug" \
    -append "$APPEND guest.sh=$E guest.run=poweroff" < /dev/null > "$run.log" 2>&1 &
  pid=$!
  i=0
  until [ -s "$run.events" ] || [ $i -ge 30 ]; do
    { echo '{"execute":"qmp_capabilities"}'; while kill -0 $pid 2>/dev/null; do sleep 1; done; } |
      nc 127.0.0.1 $QMP_PORT > "$run.events" 2>/dev/null &
    sleep 1; i=$((i + 1))
  done
  qmp_at $CMD_PORT '{"execute":"cont"}' > /dev/null 2>&1
  i=0
  until grep -q '"io-error"' "$run.status" 2>/dev/null || ! kill -0 $pid 2>/dev/null || [ $i -ge 300 ]; do
    qmp_at $CMD_PORT '{"execute":"query-status"}' > "$run.status" 2>&1
    i=$((i + 1))
  done
  qmp_at $CMD_PORT '{"execute":"query-block"}' > "$run.block" 2>&1
  check "$run-stopped-io-error" grep -qE '"running": false, "status": "io-error"|"status": "io-error", .*"running": false' "$run.status"
  check "$run-io-status-nospace" grep -q '"io-status": "nospace"' "$run.block"
  grep BLOCK_IO_ERROR "$run.events" | head -1 > "$run.error"
  check "$run-block-io-error-event" all_in "$run.error" '"qom-path": "/machine/peripheral/ve0"' \
    '"device": "e0"' '"operation": "write"' '"action": "stop"' '"nospace": true' \
    '"reason": "No space left on device"'
  check "$run-stop-after-error" sh -c "grep -o '\"event\": \"[A-Z_]*\"' $run.events | grep -A9999 BLOCK_IO_ERROR | grep -q STOP"
  rm -f full/filler
  qmp_at $CMD_PORT '{"execute":"cont"}' '{"execute":"query-status"}' '{"execute":"query-block"}' > "$run.cont" 2>&1
  check "$run-cont-running" grep -q '"status": "running"' "$run.cont"
  check "$run-cont-io-status-ok" grep -q '"io-status": "ok"' "$run.cont"
  i=0
  while kill -0 $pid 2>/dev/null && [ $i -lt $FINISH_LIMIT ]; do sleep 1; i=$((i + 1)); done
  kill $pid 2>/dev/null
  wait $pid
  rc=$?
  echo "E2E-TIME $run $(($(date +%s) - start)) s rc=$rc"
  $after "$run-exit-0" [ "$rc" = 0 ]
  $after "$run-fio-rc-0" has "$run.log" GUEST-FIO-RC=0
  $after "$run-fio-no-errors" has "$run.log" "err= 0"
  # No corruption (0, or 3: leaked clusters only); leaks are said apart.
  qemu-img check full/enospc.qcow2 > "$run.check" 2>&1
  crc=$?
  $after "$run-image-consistent" [ $crc = 0 -o $crc = 3 ]
  [ $crc = 0 ] || echo "E2E-NOTE $run: qemu-img check: $(grep -c '^Leaked' "$run.check") leaked clusters"
  echo "--- $run: events, then the replies while stopped"
  grep '"event"' "$run.events" | head -6 | cut -c1-600
  grep -h '"return"' "$run.status" "$run.block" | cut -c1-600
  grep -iE 'no space|io-error|stopped' "$run.log.debug" | head -5
  has "$run.log" GUEST-FIO-RC=0 || tail -30 "$run.log"
  umount full
}
# note NAME COMMAND...: says whether COMMAND succeeds, without counting it.
note() { name=$1; shift; if "$@"; then echo "E2E-NOTE $name: yes"; else echo "E2E-NOTE $name: NO"; fi; }
QMP_PORT=4445 CMD_PORT=4445 FINISH_LIMIT=400 after=check
enospc_boot enospc-vmm vmm -m 1G -smp 2
# QEMU is the control for the stop, the events and the replies; what follows cont is only said:
# QEMU 10.0.2's guest was seen in two runs of four never to finish after cont (no error, no STOP).
QMP_PORT=4446 CMD_PORT=4447 FINISH_LIMIT=60 after=note
enospc_boot enospc-qemu qemu-system-x86_64 -M microvm -enable-kvm -cpu host -m 1G -smp 2 \
  -nodefaults -no-reboot -display none -serial stdio -qmp tcp:127.0.0.1:$CMD_PORT,server=on,wait=off

# ---- 5: block jobs, vmm against QEMU -----------------------------------------------------------
jobs_all

# ---- 6: the full distribution -----------------------------------------------------------------
. "$DISK_DIR/debian.sh"
finish
