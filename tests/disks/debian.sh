# shellcheck shell=sh
# The full-distribution boot, sourced by tests/disks/e2e.sh in the same host (it uses e2e.sh's
# check, has, b64 and sum): the Debian 12 guest of resources/debian ($DISK_DIR/debian: base.qcow2,
# vmlinuz, initrd.img), with its root file system on a fresh qcow2 overlay of the zlib-compressed
# base.
#   1. the disk on iothread io0 (cache=none): systemd must reach `systemctl is-system-running` =
#      running with no failed unit; fio writes 8 MiB of 4 KiB random blocks through ext4
#      (O_DIRECT, libaio, queue depth 16) to /var/tmp/fio.dat and reads every block back against its
#      crc32c; `systemctl poweroff`: vmm exits 0. The overlay passes qemu-img check, the base is
#      unchanged byte for byte.
#   2. the same overlay on the main loop: running again, fio --verify_only reads the file back
#      (the same seed, so the same blocks and contents); poweroff, exit 0, the overlay checked.
# The guest prints systemd-analyze's split of its boot (kernel, initrd, userspace), kept in the log.
# A boot that vmm ends with status 0 on a triple fault before systemd printed anything (seen in the
# nested host's emulated virtualization, see e2e.sh) is booted once more, said in an E2E-NOTE line.
DEB=$DISK_DIR/debian
# The fio job of both boots: the second only reads back and verifies what the first wrote.
DEB_FIO="fio --name=debian --filename=/var/tmp/fio.dat --size=8M --bs=4k --rw=randwrite \
--ioengine=libaio --iodepth=16 --direct=1 --verify=crc32c --verify_state_save=0"
# The guest side of both boots, before its own part: wait for the boot to finish, say how it ended.
DEB_UP='state=$(systemctl is-system-running --wait)
echo "GUEST-SYSTEM-STATE $state"
systemctl list-units --failed --no-legend --plain | sed "s/^/GUEST-FAILED-UNIT /"
echo "GUEST-ROOT-FS $(findmnt -n -o FSTYPE /)"
systemd-analyze time | head -1 | sed "s/^/GUEST-ANALYZE /"'
# deb_boot LOG ARGS...: boots the Debian guest with vmm's ARGS added, within 900 s, the console in
# LOG and vmm's debug log in LOG.debug. Returns vmm's exit status.
deb_boot() {
  log=$1; shift
  for attempt in 1 2; do
    timeout 900 vmm -m 1G -smp 2 -kernel "$DEB/vmlinuz" -initrd "$DEB/initrd.img" "$@" \
      -D "$log.debug" < /dev/null > "$log" 2>&1
    rc=$?
    [ $rc = 0 ] && ! has "$log" GUEST- && has "$log.debug" 'triple fault' && [ $attempt = 1 ] || break
    echo "E2E-NOTE $log: the guest reset early ($(grep -o 'triple fault.*' "$log.debug" | head -1)); booting again"
  done
  return $rc
}
# deb_checks BOOT: the checks after each boot (check sets $name: keep the boot's own in $b).
deb_checks() {
  b=$1
  check "$b-exit-0" [ "$rc" = 0 ]
  check "$b-system-running" has "$b.log" "GUEST-SYSTEM-STATE running"
  check "$b-no-failed-unit" [ "$(grep -c GUEST-FAILED-UNIT "$b.log")" = 0 ]
  check "$b-root-ext4" has "$b.log" "GUEST-ROOT-FS ext4"
  check "$b-overlay-check" qemu-img check -q "$DEB/top.qcow2"
  check "$b-base-unchanged" [ "$(sum "$DEB/base.qcow2")" = "$deb_base_sum" ]
  grep -E 'GUEST-(ANALYZE|FAILED-UNIT)' "$b.log"
  [ "$rc" = 0 ] && has "$b.log" "GUEST-SYSTEM-STATE running" || tail -60 "$b.log"
}
deb_base_sum=$(sum "$DEB/base.qcow2")
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$DEB/top.qcow2"
DEB_APPEND="console=ttyS0 root=/dev/vda ro quiet"

W=$(b64 "$DEB_UP
$DEB_FIO --do_verify=1 > /tmp/fio.txt 2>&1
echo GUEST-FIO-RC=\$?
grep -E 'err=|verify' /tmp/fio.txt
sync
echo GUEST-POWEROFF
systemctl poweroff")
start=$(date +%s)
deb_boot debian-write.log -object iothread,id=io0 \
  -drive file="$DEB/top.qcow2",format=qcow2,if=none,id=root,cache=none \
  -device virtio-blk-device,drive=root,iothread=io0 \
  -append "$DEB_APPEND guest.sh=$W"
echo "E2E-TIME debian-write $(($(date +%s) - start)) s rc=$rc"
check debian-write-fio-rc-0 has debian-write.log GUEST-FIO-RC=0
check debian-write-fio-no-errors has debian-write.log "err= 0"
check debian-write-systemd-poweroff has debian-write.log "reboot: Power down"
deb_checks debian-write

R=$(b64 "$DEB_UP
$DEB_FIO --verify_only > /tmp/fio.txt 2>&1
echo GUEST-FIO-VERIFY-RC=\$?
grep -E 'err=|verify' /tmp/fio.txt
echo GUEST-POWEROFF
systemctl poweroff")
start=$(date +%s)
deb_boot debian-read.log \
  -drive file="$DEB/top.qcow2",format=qcow2,if=none,id=root \
  -device virtio-blk-device,drive=root \
  -append "$DEB_APPEND guest.sh=$R"
echo "E2E-TIME debian-read $(($(date +%s) - start)) s rc=$rc"
check debian-read-fio-verify-rc-0 has debian-read.log GUEST-FIO-VERIFY-RC=0
check debian-read-fio-no-errors has debian-read.log "err= 0"
deb_checks debian-read
