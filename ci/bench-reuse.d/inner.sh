# The inner half of ci/bench-reuse, run by resources/nested-host (busybox sh in the nested host,
# /bin/sh on direct KVM). ci/bench-reuse prepends the plan:
#   VMMS      "vmm qemu vmm-baseline" (a subset), the guests to boot, in order;
#   RUNTIME   seconds of discard and rewrite after the fill;
#   SIZE_MIB  the data disk's size; CACHE  its cache mode; FSYNC  writes between guest flushes
#             (0: none); INTERVAL  seconds between samples; QEMU_BASELINE  the start of QEMU's
#             command line (ci/qemu-baseline.args).
# Each boot: a 2-vCPU 1 GiB guest with initrd-fio.img and one disk, a fresh qcow2 image (64 KiB
# clusters) on an iothread with discard=unmap, the same flags for every VMM (QEMU: microvm,
# -object iothread, -device virtio-blk-device). The guest (a script on its command line) fills the
# whole disk (fio, sequential 64 KiB writes, QD32), then for RUNTIME seconds runs two fio jobs at
# once, 64 KiB blocks, O_DIRECT, libaio: "churn" trims and then rewrites each block of the first
# half in turn (rw=trimwrite, QD32), "busy" rewrites random blocks of the second half in place
# (QD32, a flush of the whole disk every FSYNC writes: fio never flushes in trimwrite mode), so
# requests stay in flight all along. Meanwhile, every INTERVAL
# seconds, this script samples the image: its length (stat %s), its allocated bytes (stat %b * %B)
# and the guest data it maps (qemu-img map -U: data clusters of the image itself). After the guest
# powers off: one last sample and qemu-img check. The guest prints its queue's write_cache and
# /sys/block/DEV/stat (fields 16 and 17: flushes) in a REUSE-QUEUE line. Leaves in $OUT_DIR:
# NAME.samples (t_s phase length allocated live), NAME.console.log, NAME.debug.log (-D),
# NAME.check, NAME.summary (one key=value per line), NAME.map-errors, host.txt.
set -u
G=$GUEST_DIR
cd "$DISK_DIR"
say() { echo "reuse: $*"; }

{
  echo "host=$NESTED_HOST"
  echo "host_vcpus=$(grep -c '^processor' /proc/cpuinfo)"
  echo "host_kernel=$(uname -r)"
  echo "qemu=$(qemu-system-x86_64 --version | head -1)"
} > "$OUT_DIR/host.txt"

half=$((SIZE_MIB / 2))
fsync_opt=""
[ "$FSYNC" = 0 ] || fsync_opt="--fsync=$FSYNC"
guest_body="D=\$(for d in /sys/block/vd*; do echo /dev/\${d##*/}; done | head -1)
echo REUSE-DISK \$D discard_max_bytes=\$(cat /sys/block/\${D#/dev/}/queue/discard_max_bytes) discard_granularity=\$(cat /sys/block/\${D#/dev/}/queue/discard_granularity)
cd /tmp
fio --name=fill --filename=\$D --direct=1 --ioengine=libaio --bs=64k --iodepth=32 --rw=write --eta=never --output-format=terse >/dev/null 2>fill.err
echo REUSE-FILLED rc=\$?; sed 's/^/REUSE-FIO-ERR /' fill.err
fio --filename=\$D --direct=1 --ioengine=libaio --bs=64k --time_based --runtime=$RUNTIME --eta=never \
 --name=churn --rw=trimwrite --iodepth=32 --offset=0 --size=${half}M \
 --name=busy --rw=randwrite --iodepth=32 --offset=${half}M --size=${half}M $fsync_opt >churn.out 2>churn.err
r=\$?
echo REUSE-CHURNED rc=\$r
echo REUSE-QUEUE write_cache=\$(cat /sys/block/\${D#/dev/}/queue/write_cache | tr ' ' _) stat: \$(cat /sys/block/\${D#/dev/}/stat)
grep -E '^ *(churn|busy):|IOPS=' churn.out | sed 's/^/REUSE-FIO /'
sed 's/^/REUSE-FIO-ERR /' churn.err
echo REUSE-GUEST-DONE"

# sample T PHASE FILE: "T PHASE LENGTH ALLOCATED LIVE" (bytes; LIVE: the data clusters FILE maps,
# "-" when qemu-img map failed: its first line goes to NAME.map-errors).
sample() {
  len_blocks=$(stat -c '%s %b %B' "$3")
  live=-
  if qemu-img map -U -f qcow2 --output=json "$3" > map.json 2> map.err; then
    live=$(awk '/"depth": 0/ && /"data": true/ { if (match($0, /"length": [0-9]+/)) s += substr($0, RSTART + 10, RLENGTH - 10) }
      END { printf "%d", s }' map.json)
  else
    echo "$1 $(head -1 map.err)" >> "$OUT_DIR/$name.map-errors"
  fi
  echo "$1 $2 $len_blocks" | awk -v live="$live" '{ printf "%s %s %d %d %s\n", $1, $2, $3, $4 * $5, live }'
}
count() { c=$(grep -c "$1" console.log 2>/dev/null); echo "${c:-0}"; }

port=4450
status=0
for name in $VMMS; do
  port=$((port + 1))
  rm -rf run; mkdir run
  file=run/d.qcow2
  qemu-img create -q -f qcow2 -o cluster_size=65536 "$file" "${SIZE_MIB}M"
  case $name in
    qemu) cmd="$QEMU_BASELINE -m 1G -smp 2" ;;
    *) cmd="$name -m 1G -smp 2" ;;
  esac
  gs=$(printf '%s\n' "$guest_body" | base64 | tr -d '\n')
  say "boot $name: ${SIZE_MIB} MiB qcow2, cache=$CACHE, fill, then ${RUNTIME} s of discard and rewrite"
  start=$(date +%s)
  # shellcheck disable=SC2086 # $cmd is a word list on purpose
  timeout $((RUNTIME + 900)) $cmd -kernel "$G/bzImage" -initrd "$G/initrd-fio.img" \
    -object iothread,id=io0 \
    -drive "file=$file,format=qcow2,if=none,id=d0,cache=$CACHE,discard=unmap" \
    -device "virtio-blk-device,drive=d0,id=vd0,iothread=io0" \
    -D run/debug.log -append "console=ttyS0 quiet guest.sh=$gs guest.run=poweroff" \
    < /dev/null > console.log 2>&1 &
  pid=$!
  samples="$OUT_DIR/$name.samples"
  : > "$samples"
  phase=boot last=0
  while kill -0 $pid 2>/dev/null; do
    now=$(($(date +%s) - start))
    case $phase in
      boot) [ "$(count REUSE-DISK)" = 0 ] || { phase=fill; say "$name: guest up after $now s"; } ;;
      fill) [ "$(count REUSE-FILLED)" = 0 ] || { phase=churn; say "$name: disk filled after $now s"; } ;;
      churn) [ "$(count REUSE-CHURNED)" = 0 ] || phase=end ;;
    esac
    if [ "$phase" != boot ] && [ $((now - last)) -ge "$INTERVAL" ]; then
      last=$now
      sample "$now" "$phase" "$file" >> "$samples"
      [ "$phase" != churn ] || say "$name: $(tail -1 "$samples")"
    fi
    sleep 1
  done
  wait $pid
  rc=$?
  sample "$(($(date +%s) - start))" final "$file" >> "$samples"
  tr -d '\r' < console.log > "$OUT_DIR/$name.console.log"
  cp run/debug.log "$OUT_DIR/$name.debug.log" 2>/dev/null
  qemu-img check "$file" > "$OUT_DIR/$name.check" 2>&1
  check_rc=$?
  grep -E 'REUSE-DISK|REUSE-QUEUE|REUSE-FIO|rc=' "$OUT_DIR/$name.console.log"
  # The figures: peak live data over the whole run; length and allocation at their largest during
  # the churn and at the end (after the guest powered off and the image was closed).
  awk -v name="$name" -v rc="$rc" -v check_rc="$check_rc" -v churn_rc="$(grep -o 'REUSE-CHURNED rc=[0-9]*' "$OUT_DIR/$name.console.log" | cut -d= -f2)" '
    function mib(b) { return sprintf("%.1f", b / 1048576) }
    $2 != "final" { if ($5 != "-" && $5 + 0 > peak) peak = $5 + 0; if ($3 > maxlen) maxlen = $3; if ($4 > maxalloc) maxalloc = $4
      if ($2 == "churn") { n++; if (n == 1) first = $1; lastt = $1 } }
    $2 == "final" { flen = $3; falloc = $4; flive = $5 }
    END {
      if (flive != "-" && flive + 0 > peak) peak = flive + 0
      print "vmm=" name; print "exit=" rc; print "fio_churn_rc=" churn_rc; print "check_rc=" check_rc
      print "churn_samples=" n; print "churn_seconds_sampled=" lastt - first
      print "peak_live_mib=" mib(peak); print "final_live_mib=" mib(flive)
      print "max_length_mib=" mib(maxlen); print "final_length_mib=" mib(flen)
      print "max_allocated_mib=" mib(maxalloc); print "final_allocated_mib=" mib(falloc)
      if (peak > 0) {
        printf "max_length_over_peak_live=%.3f\n", maxlen / peak
        printf "final_length_over_peak_live=%.3f\n", flen / peak
        printf "max_allocated_over_peak_live=%.3f\n", maxalloc / peak
      }
    }' "$samples" > "$OUT_DIR/$name.summary"
  say "$name: exit $rc, $(($(date +%s) - start)) s; $(tr '\n' ' ' < "$OUT_DIR/$name.summary")"
  # qemu-img check: 0 clean, 3 leaked clusters only (space lost, reported in NAME.check).
  [ "$rc" = 0 ] && { [ "$check_rc" = 0 ] || [ "$check_rc" = 3 ]; } || status=1
  rm -rf run
  sync
done
exit $status
