# The inner half of ci/bench-latency, run by resources/nested-host (busybox sh in the nested host,
# /bin/sh on direct KVM). ci/bench-latency prepends the plan:
#   BOOTS    "VMM:PLACEMENT:IMAGE ..." in run order (VMM vmm|vmm-NAME|qemu, PLACEMENT
#            main-loop|iothread, then +pci for a virtio-blk-pci disk (else virtio-mmio),
#            +per-queue for one iothread per queue (iothread+pci only) and +nopoll for
#            iothreads with poll-max-ns=0, +aio-ENGINE for the drive's aio=ENGINE (else the
#            VMM's best, AIO_QEMU or AIO_VMM), IMAGE raw|qcow2|chain3): one guest boot each,
#            interleaved;
#   VARIANT_NAME  for each vmm-NAME of BOOTS: the arguments appended to vmm's command line;
#   VARIANT_BIN_NAME  for a vmm-NAME that is another build of vmm: the executable's name in PATH;
#   CONFS    "RW:QD:LOAD ..." what each boot runs (randread/randwrite, 1/32,
#            quiet/disturbed/fsync-writer/stream-full/stream-10M);
#   ROUND, ROUNDS  this run is round ROUND of ROUNDS (with several, results are named TAG.rN);
#   RUNTIME  fio's measured seconds per configuration (after 1 s of ramp);
#   VCPUS    the guest's vCPUs; NUMJOBS  fio's jobs (1: pinned to vCPU 0; more: one per vCPU,
#            --cpus_allowed_policy=split, --group_reporting), in the guest and the host baseline;
#   IMAGE_MIB, NCONF (fio runs in all, for the progress lines);
#   POLL_INTERVAL  seconds between a QMP reply and the next query-blockstats (0: flood, pipelined);
#   QEMU_BASELINE  the start of QEMU's command line (ci/qemu-baseline.args);
#   QEMU_BASELINE_PCI  the same with microvm's PCIe root (pcie=on), for +pci boots.
#   AIO_QEMU, AIO_VMM  each VMM's fastest aio engine (-drive aio=), for boots without +aio-.
#   GUEST_TRACE  1: the guest traces its block layer while fio runs (raw/TAG.gt below).
# Each boot: a 2-vCPU 1 GiB guest with initrd-fio.img, its one disk a fresh copy of the image, the
# same flags for both VMMs (QEMU: microvm, -object iothread, -device virtio-blk-device or
# virtio-blk-pci with microvm's pcie=on; +per-queue: VCPUS iothreads io0... and the JSON -device
# with num-queues VCPUS and iothread-vq-mapping over them, round-robin: queue i on ioI),
# cache=none with the aio engine the boot names, and a monitor on -qmp tcp:127.0.0.1:PORT.
# The guest (a script on its command line) runs fio with --output-format=json per configuration
# and prints the JSON between BENCH-FIO-BEGIN/END lines.
# "disturbed": on the guest's second vCPU (fio is pinned to the first) a shell spins and another
# streams a line to the serial console every 10 ms, and while fio runs a QMP client here polls
# query-blockstats on one connection (paced, or a pipelined flood), so the VMM's main loop keeps
# working. "fsync-writer": a second fio job in the same fio run, on the guest's second vCPU, writes
# 4 KiB at random to the same disk at QD1 with fsync=1 (the JSON's first job is the measured one).
# "stream-full", "stream-10M" (chain3): when the guest announces the load, a QMP client here starts
# block-stream on the disk (job stream0, speed 0 or 10485760 bytes/s: the chain's lower layers
# copied into its top) and the guest starts fio a second later; when fio stops, the client asks
# query-block-jobs whether the job still runs, then cancels it. A stream leaves the chain flat, so
# each stream load gets a boot of its own with a fresh copy of the chain's top (the other loads
# share one).
# A guest that ends before all its configurations ran (it reset itself, or made no
# progress for RUNTIME + 60 s, 60 s more before its first result, and was killed) is booted again
# for the missing ones, up to twice;
# each such event is a "bench: RETRY" line. Results are synced to the disk after each boot, and a
# boot whose results are there already is skipped: when the outer host fails, nested-host's second
# attempt (same disk) resumes where the first stopped. Leaves in $OUT_DIR: raw/TAG.json (fio), raw/TAG.polls
# (replies the poller got), raw/TAG.sched (each VMM thread's CPU time and run-queue wait while fio
# ran, from /proc/PID/task/*/schedstat, sampled when the guest announces and ends each run: within
# half a second of fio's own window; QEMU runs with debug-threads=on to name its threads),
# raw/TAG.stages (vmm only: its x-query-blockstats-stages replies at the run's start and stop),
# raw/TAG.kvm (KVM's counters in /sys/kernel/debug/kvm that changed between the same two samples,
# "NAME DELTA": exits, io_exits, mmio_exits, irq_injections, halt_exits...; they sum every VM of
# the host, one here at a time in the nested host),
# raw/host.PLACEMENT.IMAGE.RW.qdN.native.json (the host-native baseline: fio in this host, before
# the boots, on a copy of the raw image with the guest's options),
# raw/TAG.irq (the guest's interrupts over each fio run, from /proc/interrupts just before and
# after it, printed after the run as BENCH-IRQ0/1 TAG lines: "NAME DELTA" for each virtio vector,
# the console, LOC timer ticks and RES/CAL IPIs, summed over the vCPUs), console/BOOT.log and
# BOOT.debug.log (the VMM's -D log: why it stopped),
# raw/TAG.stream (stream loads: every line the client got and its own marks "clock EPOCH" (this
# host's wall clock), "start SPEED" and "fio-stop", each after this host's uptime), raw/TAG.lat
# (every run of a part with stream loads: fio's completion log, "EPOCH_MS LAT_NS" per completion
# of its measured window on the guest's wall clock, printed after its JSON as BENCH-LAT TAG lines),
# raw/TAG.gt (GUEST_TRACE=1: the guest's block layer over the run, ramp included, from its
# block_bio_queue, block_rq_issue and block_rq_complete tracepoints: "IOS BEFORE DEVICE P99 MAX",
# the requests completed, the mean µs from the bio queued to the request issued to the driver
# and from issued to completed (the notification, the VMM and the interrupt), and the p99 and
# maximum of queued to completed, printed after the run as a BENCH-GT TAG line),
# version-VMM.json (query-version), host.txt.
set -u
G=$GUEST_DIR
cd "$DISK_DIR"
mkdir -p "$OUT_DIR/raw" "$OUT_DIR/console"
say() { echo "bench: $*"; }
nap() { sleep 0.5 2>/dev/null || sleep 1; }

{
  echo "host=$NESTED_HOST"
  echo "host_vcpus=$(grep -c '^processor' /proc/cpuinfo)"
  echo "host_kernel=$(uname -r)"
  echo "qemu=$(qemu-system-x86_64 --version | head -1)"
} > "$OUT_DIR/host.txt"

# The images, made once, copied fresh for every boot (a write run changes them). Every cluster is
# allocated, so a read never hits a hole. chain3: base <- mid <- top, relative backing names; mid
# owns the first third of the disk, top the second, base the rest, so reads walk all three layers.
need() { case " $BOOTS " in *":$1 "*) return 0 ;; esac; return 1; }
mkdir -p img
qemu-img create -q -f raw img/raw.raw "${IMAGE_MIB}M"
qemu-io -f raw -c "write -P 0xab 0 ${IMAGE_MIB}M" img/raw.raw > /dev/null
if need qcow2; then qemu-img convert -f raw -O qcow2 img/raw.raw img/qcow2.qcow2; fi
if need chain3; then
  third=$((IMAGE_MIB / 3))
  mkdir -p img/chain
  qemu-img convert -f raw -O qcow2 img/raw.raw img/chain/base.qcow2
  (cd img/chain && qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2 &&
    qemu-io -f qcow2 -c "write -P 0xcd 0 ${third}M" mid.qcow2 > /dev/null &&
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2 &&
    qemu-io -f qcow2 -c "write -P 0xef ${third}M ${third}M" top.qcow2 > /dev/null)
fi
say "images ready: $(ls img img/chain 2>/dev/null | tr '\n' ' ')"

# The host-native baseline, before the boots: fio here, on a fresh copy of the raw image (the
# disk's bytes on the same ext4, without a format: for qcow2 and chain3 the VMMs' overhead over it
# includes the format's), once per pattern and depth of this part, the guest's fio options.
host_place=${BOOTS%% *}; host_place=${host_place#*:}; host_image=${host_place#*:}; host_place=${host_place%%:*}
host_place=${host_place%%+*}
for c in $(for c in $CONFS; do echo "${c%:*}"; done | sort -u); do
  rw=${c%%:*}; qd=${c#*:}
  t=host.$host_place.$host_image.$rw.qd$qd.native
  [ "$ROUNDS" = 1 ] || t=$t.r$ROUND
  if grep -q '"jobs"' "$OUT_DIR/raw/$t.json" 2>/dev/null; then continue; fi
  cp img/raw.raw host.raw
  fio --eta=never --output-format=json --output="$OUT_DIR/raw/$t.json.part" --name=bench \
    --filename=host.raw --direct=1 --ioengine=libaio --rw="$rw" --bs=4k --iodepth="$qd" \
    --numjobs="$NUMJOBS" --group_reporting \
    --ramp_time=1 --runtime="$RUNTIME" --time_based &&
    mv "$OUT_DIR/raw/$t.json.part" "$OUT_DIR/raw/$t.json"
  say "host fio $rw QD$qd on the raw image: exit $?"
  rm -f host.raw
done
need raw || rm -f img/raw.raw

# The guest's script: the fio runs of one boot (variables P CONFS RT NJ prepended). Its dmesg -n 1
# keeps kernel messages (an RCU stall report under load) from landing inside the JSON on the console.
guest_body='cd /tmp
[ -z "$GT" ]||{ T=/sys/kernel/tracing;mount -t tracefs t $T;echo 8192 >$T/buffer_size_kb;for e in bio_queue rq_issue rq_complete;do echo 1 >$T/events/block/block_$e/enable;done;}
irqs() { grep -E "CPU|virtio|ttyS|LOC|RES|CAL" /proc/interrupts; }
jobs=--cpus_allowed=0
[ $NJ = 1 ] || jobs="--numjobs=$NJ --cpus_allowed=0-$((NJ - 1)) --cpus_allowed_policy=split --group_reporting"
for c in $CONFS; do
rw=${c%%:*}; r=${c#*:}; qd=${r%%:*}; ld=${r#*:}
t=$P.$rw.qd$qd.$ld
if [ $ld = disturbed ]; then
taskset 2 sh -c "while :; do :; done" & s1=$!
taskset 2 sh -c "while :; do echo BENCH-NOISE serial output streaming from the guest vCPU 1; usleep 10000; done" & s2=$!
echo BENCH-LOAD-ON $t; sleep 3
fi
case $ld in stream-*) echo BENCH-LOAD-ON $t; sleep 1 ;; esac
wr=""
[ $ld = fsync-writer ] && wr="--name=writer --filename=/dev/vda --direct=1 --ioengine=libaio --rw=randwrite --bs=4k --iodepth=1 --fsync=1 --ramp_time=1 --runtime=$RT --time_based --cpus_allowed=1"
irqs > i0
echo BENCH-FIO-START $t
[ -z "$GT" ]||echo >$T/trace
rm -f f_*.log
fio --eta=never --output-format=json --output=f.json --name=bench --filename=/dev/vda --direct=1 --ioengine=libaio --rw=$rw --bs=4k --iodepth=$qd --ramp_time=1 --runtime=$RT --time_based $jobs $LL $wr 2>f.err
r=$?
irqs > i1
echo BENCH-FIO-STOP $t
if [ $ld = disturbed ]; then kill $s1 $s2; wait $s1 $s2 2>/dev/null; echo BENCH-LOAD-OFF $t; fi
case $ld in stream-*) echo BENCH-LOAD-OFF $t ;; esac
dmesg -n 1 2>/dev/null
echo BENCH-FIO-BEGIN $t; cat f.json; echo BENCH-FIO-END $t $r; sed "s/^/BENCH-FIO-ERR /" f.err
[ -z "$LL" ] || cat f_clat.*.log | sed "s/^/BENCH-LAT $t /"
[ -z "$GT" ]||awk "{for(i=6;i<NF;i++)if(\$i==\"+\")s=\$(i-1);x=\$4*1e6}/_queue:/{q[s]=x}/_issue:/&&q[s]{u[s]=x}/_complete:/&&u[s]{print u[s]-q[s],x-u[s],x-q[s]}" $T/trace|sort -nk3|awk -vt=$t "{a+=\$1;b+=\$2;c[NR]=\$3}END{if(NR)print \"BENCH-GT\",t,NR,a/NR,b/NR,c[int(NR*.99)+1],c[NR]}"
sed "s/^/BENCH-IRQ0 $t /" i0; sed "s/^/BENCH-IRQ1 $t /" i1
dmesg -n 4 2>/dev/null
done
sleep 1
echo BENCH-GUEST-DONE'
# guest_script VARS CONFS: the guest's script for a boot running CONFS, base64 for the kernel's
# command line (guest.sh=), VARS first. The kernel takes 2047 bytes of command line, which the
# whole body passes: the lines of loads CONFS does not have are left out.
guest_script() {
  body=$guest_body
  case " $2" in *:disturbed*) ;; *) body=$(printf '%s\n' "$body" |
    sed '/^if \[ \$ld = disturbed \]; then$/,/^fi$/d; /^if \[ \$ld = disturbed \]; then kill/d') ;; esac
  case " $2" in *:fsync-writer*) ;; *) body=$(printf '%s\n' "$body" | sed '/^\[ \$ld = fsync-writer \]/d') ;; esac
  case " $2" in *:stream-*) ;; *) body=$(printf '%s\n' "$body" | sed '/^case \$ld in stream-/d') ;; esac
  case " $CONFS" in
    *:stream-*) ;;
    *) body=$(printf '%s\n' "$body" | sed '/^\[ -z "\$LL" \]/d') ;;
  esac
  case " $1" in
    *" GT=1"*) ;;
    *) body=$(printf '%s\n' "$body" | sed '/^\[ -z "\$GT" \]/d') ;;
  esac
  printf '%s\n%s\n' "$1" "$body" | base64 | tr -d '\n'
}

poll_start() { # $1 port, $2 tag
  touch poll.on
  rm -f poll.in poll.out nc.pid
  mkfifo poll.in poll.out
  polls="$OUT_DIR/raw/$2.polls"
  [ "$ROUNDS" = 1 ] || polls="$OUT_DIR/raw/$2.r$ROUND.polls"
  if [ "$POLL_INTERVAL" = 0 ]; then
    # Flood: requests back to back on one connection without waiting, every reply read.
    (nc 127.0.0.1 "$1" < poll.in & echo $! > nc.pid; wait) | grep -c '"return"' > "$polls" &
    ( printf '%s\n' '{"execute":"qmp_capabilities"}'
      while [ -e poll.on ]; do printf '%s\n' '{"execute":"query-blockstats"}'; done ) > poll.in &
  else
    # Paced: one request, its reply read, then POLL_INTERVAL seconds: the same offered load for
    # every VMM that answers within the interval.
    nc 127.0.0.1 "$1" < poll.in > poll.out &
    echo $! > nc.pid
    ( exec 3> poll.in 4< poll.out
      read -r line <&4
      printf '%s\n' '{"execute":"qmp_capabilities"}' >&3; read -r line <&4
      n=0
      while [ -e poll.on ]; do
        printf '%s\n' '{"execute":"query-blockstats"}' >&3
        read -r line <&4 || break
        n=$((n + 1))
        echo $n > "$polls"
        sleep "$POLL_INTERVAL"
      done ) &
  fi
  writer=$!
}
poll_stop() {
  rm -f poll.on
  # A guest whose runs end as fast as they start may show a load's end before its start was seen.
  [ -n "$writer" ] || return 0
  if [ "$POLL_INTERVAL" = 0 ]; then
    i=0; while [ ! -s nc.pid ] && [ $i -lt 10 ]; do nap; i=$((i + 1)); done
    [ -s nc.pid ] && kill "$(cat nc.pid)" 2>/dev/null
    kill "$writer" 2>/dev/null
  else
    # The paced client ends its loop within one interval and a reply.
    i=0; while kill -0 "$writer" 2>/dev/null && [ $i -lt 20 ]; do nap; i=$((i + 1)); done
    kill "$writer" 2>/dev/null
    kill "$(cat nc.pid)" 2>/dev/null
  fi
  wait "$writer" 2>/dev/null
  writer=""
  rm -f nc.pid poll.in poll.out
}
mount -t debugfs none /sys/kernel/debug 2>/dev/null
kvm_snap() { for f in /sys/kernel/debug/kvm/*; do [ -f "$f" ] && echo "${f##*/} $(cat "$f")"; done; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
# epoch_s: this host's wall clock in seconds with microseconds (busybox's date has no %N).
epoch_s() {
  case $(date +%N) in
    *N) adjtimex |
      awk '/tv_sec/ { s = $2 } /tv_usec/ { u = $2 } END { printf "%d.%06d\n", s, u }' ;;
    *) date +%s.%N ;;
  esac
}
# stream_send LINE...: to the stream's QMP connection, in a subshell (a VMM gone makes the write
# raise SIGPIPE, which must not end this script).
stream_send() { (printf '%s\n' "$@" >&5) 2>/dev/null; }
# stream_start PORT TAG: block-stream on the disk (speed 0 for stream-full, 10 MiB/s for
# stream-10M) over a QMP connection kept open until stream_stop; every line it receives goes to
# raw/TAG.stream after this host's uptime, beside the marks "start SPEED" and "fio-stop".
stream_start() {
  case $2 in *.stream-10M) speed=10485760 ;; *) speed=0 ;; esac
  stream="$OUT_DIR/raw/$2.stream"
  [ "$ROUNDS" = 1 ] || stream="$OUT_DIR/raw/$2.r$ROUND.stream"
  : > "$stream"
  rm -f stream.in stream.out
  mkfifo stream.in stream.out
  nc 127.0.0.1 "$1" < stream.in > stream.out &
  stream_nc=$!
  while read -r line; do echo "$(uptime_s) $line"; done < stream.out >> "$stream" &
  stream_reader=$!
  exec 5> stream.in
  stream_send '{"execute":"qmp_capabilities"}'
  echo "$(uptime_s) clock $(epoch_s)" >> "$stream"
  echo "$(uptime_s) start $speed" >> "$stream"
  stream_send "{\"execute\":\"block-stream\",\"arguments\":{\"device\":\"d0\",\"job-id\":\"stream0\",\"speed\":$speed}}"
}
# stream_stop: fio has stopped: how long ago the disk's last request completed (query-blockstats'
# idle_time_ns, against fio's last completion on the guest's clock), whether the job still runs
# (query-block-jobs), then its cancel;
# waits (up to 10 s) for that reply and for the job's end (its event, or the cancel's error when
# there was no job).
stream_stop() {
  echo "$(uptime_s) fio-stop" >> "$stream"
  stream_send '{"execute":"query-blockstats"}' '{"execute":"query-block-jobs"}' \
    '{"execute":"block-job-cancel","arguments":{"device":"stream0"}}'
  i=0
  while ! awk '/ fio-stop$/ { s = 1 } s && /"return": *\[/ { q = 1 }
      /BLOCK_JOB_(COMPLETED|CANCELLED)|"error"/ { e = 1 } END { exit !(q && e) }' "$stream" &&
    [ $i -lt 20 ]; do
    nap; i=$((i + 1))
  done
  exec 5>&-
  kill "$stream_nc" 2>/dev/null
  wait "$stream_nc" "$stream_reader" 2>/dev/null
  stream=""
  rm -f stream.in stream.out
}
count() { c=$(grep -c "$1" console.log 2>/dev/null); echo "${c:-0}"; }
# sched_snap PID: the uptime, then "TID NAME RUN_NS WAIT_NS" for each of the VMM's threads
# (/proc/PID/task/TID/schedstat: time on a CPU, time runnable but waiting for one).
sched_snap() {
  cut -d' ' -f1 /proc/uptime
  for task in /proc/$1/task/*; do
    read -r run wait _ < "$task/schedstat" 2>/dev/null || continue
    echo "${task##*/} $(tr ' ' '_' < "$task/comm") $run $wait"
  done
}
# sched_diff BEFORE AFTER: "wall_ms N", then "NAME RUN_MS WAIT_MS" per thread busy meanwhile.
sched_diff() {
  awk 'FNR == 1 { t[FILENAME == ARGV[1]] = $1; next }
    FILENAME == ARGV[1] { r[$1] = $3; w[$1] = $4; next }
    { dr = ($3 - r[$1]) / 1e6; dw = ($4 - w[$1]) / 1e6
      if (dr + dw >= 1) printf "%s %.0f %.0f\n", $2, dr, dw }
    END { printf "wall_ms %.0f 0\n", (t[0] - t[1]) * 1000 }' "$1" "$2" | sort -k2,2nr
}
# stages_snap: vmm's x-query-blockstats-stages reply (one line), nothing for QEMU.
stages_snap() {
  case $vmm in vmm|vmm-*) ;; *) return 0 ;; esac
  { printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"x-query-blockstats-stages"}'
    sleep 1; } | nc 127.0.0.1 $port | grep '"stages"'
}
profile() { # the VMM's threads (and vmm's stage timing) when a fio run starts, and when it stops
  c=$(count BENCH-FIO-START)
  if [ "$c" -gt $starts ]; then
    starts=$c; kvm_snap > run/kvm.before; sched_snap $pid > run/sched.before; stages_snap > run/stages.before
  fi
  c=$(count BENCH-FIO-STOP)
  if [ "$c" -gt $stops ]; then
    stops=$c
    if [ -s run/sched.before ] && [ -d /proc/$pid/task ]; then
      sched_snap $pid > run/sched.after
      kvm_snap > run/kvm.after
      sched="$OUT_DIR/raw/$(grep BENCH-FIO-STOP console.log | tail -1 | tr -d '\r' | cut -d' ' -f2)"
      [ "$ROUNDS" = 1 ] || sched=$sched.r$round
      sched_diff run/sched.before run/sched.after > "$sched.sched"
      awk 'FNR == NR { b[$1] = $2; next } ($2 - b[$1]) != 0 { print $1, $2 - b[$1] }' run/kvm.before run/kvm.after > "$sched.kvm"
      if [ -s run/stages.before ]; then
        cp run/stages.before "$sched.stages"; stages_snap >> "$sched.stages"
      fi
    fi
    rm -f run/sched.before run/stages.before
  fi
}
progress() { # a line per fio run finished since the last call
  c=$(count BENCH-FIO-END)
  while [ "$c" -gt $ends ]; do
    ends=$((ends + 1)); done_confs=$((done_confs + 1))
    line=$(grep BENCH-FIO-END console.log | sed -n "${ends}p" | tr -d '\r')
    say "[$done_confs/$NCONF] $(echo "$line" | awk '{print $2 ", fio exit " $3}'), $(($(date +%s) - start)) s into this boot"
  done
}

# run_boot VMM PLACE IMAGE ROUND CONFS: one guest boot running CONFS; sets $rc and $got.
run_boot() {
  vmm=$1 place=$2 image=$3 round=$4 confs=$5
  port=$((port + 1))
  rm -rf run; mkdir run
  case $image in
    raw) cp img/raw.raw run/d.raw; file=run/d.raw; fmt=raw ;;
    qcow2) cp img/qcow2.qcow2 run/d.qcow2; file=run/d.qcow2; fmt=qcow2 ;;
    # Writes (the guest's, a stream's) go to the top only: the lower layers are linked.
    chain3) cp img/chain/top.qcow2 run/; ln img/chain/base.qcow2 img/chain/mid.qcow2 run/
      file=run/top.qcow2; fmt=qcow2 ;;
  esac
  # The copy's pages are dirty in this host's page cache until written back (30 s and more, after
  # the images' own): meanwhile io_uring's non-blocking reads of them fail (-EAGAIN) and the
  # kernel hands them to io-wq workers, which on one CPU swamped the first boots of each part.
  sync
  io="" dev="" extra="" device=virtio-blk-device qemu=$QEMU_BASELINE popt=""
  case +$place+ in *+pci+*) device=virtio-blk-pci qemu=$QEMU_BASELINE_PCI ;; esac
  case +$place+ in *+nopoll+*) popt=",poll-max-ns=0" ;; esac
  case $place in iothread*) io="-object iothread,id=io0$popt"; dev=",iothread=io0" ;; esac
  case $vmm in qemu) aio=$AIO_QEMU ;; *) aio=$AIO_VMM ;; esac
  case +$place+ in *+aio-*) aio=${place##*+aio-} ;; esac
  devarg="$device,drive=d0,id=vd0$dev"
  case +$place+ in
    *+per-queue+*)
      io="" map="" i=0
      while [ $i -lt "$VCPUS" ]; do
        io="$io -object iothread,id=io$i$popt"; map="$map${map:+,}{\"iothread\":\"io$i\"}"
        i=$((i + 1))
      done
      devarg="{\"driver\":\"$device\",\"drive\":\"d0\",\"id\":\"vd0\",\"num-queues\":$VCPUS,\"iothread-vq-mapping\":[$map]}" ;;
  esac
  case $vmm in
    vmm) cmd="vmm -m 1G -smp $VCPUS" ;;
    vmm-*) eval "extra=\$VARIANT_${vmm#vmm-} bin=\${VARIANT_BIN_${vmm#vmm-}:-vmm}"; cmd="$bin -m 1G -smp $VCPUS" ;;
    qemu) cmd="$qemu -m 1G -smp $VCPUS -name bench,debug-threads=on" ;;
  esac
  p=$vmm.$place.$image
  [ "$ROUNDS" = 1 ] || p=$p.r$round
  vars="P=$vmm.$place.$image RT=$RUNTIME NJ=$NUMJOBS CONFS=\"$confs\""
  # With stream loads, every run of the part (quiet's too) logs each completion (fio's clat log,
  # its times on the guest's wall clock), printed after its JSON as BENCH-LAT TAG lines.
  case " $CONFS" in
    *:stream-*) vars="$vars LL=\"--write_lat_log=f --log_avg_msec=0 --log_unix_epoch=1\"" ;;
  esac
  [ "${GUEST_TRACE:-}" != 1 ] || vars="$vars GT=1"
  gs=$(guest_script "$vars" "$confs")
  n=$(echo $confs | wc -w)
  say "boot $vmm $place $image$([ "$ROUNDS" = 1 ] || echo " round $round") ($n configurations)"
  # The exact command line (the guest's script, base64 on the kernel's, shortened).
  say "command: $cmd -kernel $G/bzImage -initrd $G/initrd-fio.img $io -drive file=$file,format=$fmt,if=none,id=d0,cache=none,aio=$aio -device '$devarg' -qmp tcp:127.0.0.1:$port,server=on,wait=off -D run/debug.log -append 'console=ttyS0 quiet guest.sh=... guest.run=poweroff' $extra"
  # shellcheck disable=SC2086 # $cmd, $io and $extra are word lists on purpose
  $cmd -kernel "$G/bzImage" -initrd "$G/initrd-fio.img" $io \
    -drive "file=$file,format=$fmt,if=none,id=d0,cache=none,aio=$aio" \
    -device "$devarg" \
    -qmp "tcp:127.0.0.1:$port,server=on,wait=off" \
    -D run/debug.log -append "console=ttyS0 quiet guest.sh=$gs guest.run=poweroff" $extra \
    < /dev/null > console.log 2>&1 &
  pid=$!
  start=$(date +%s) last=$start
  on=0 off=0 starts=0 stops=0 ends=0 hung=""
  while kill -0 $pid 2>/dev/null; do
    profile
    if [ ! -e "$OUT_DIR/version-$vmm.json" ] && grep -q GUEST-USERSPACE-UP console.log; then
      { printf '%s\n' '{"execute":"qmp_capabilities"}' '{"execute":"query-version"}'; sleep 1; } |
        nc 127.0.0.1 $port | grep '"qemu"' > "$OUT_DIR/version-$vmm.json"
    fi
    c=$(count BENCH-LOAD-ON)
    if [ "$c" -gt $on ]; then
      on=$c; t=$(grep BENCH-LOAD-ON console.log | tail -1 | tr -d '\r' | cut -d' ' -f2)
      case $t in *.stream-*) stream_start $port "$t" ;; *) poll_start $port "$t" ;; esac
    fi
    c=$(count BENCH-LOAD-OFF)
    if [ "$c" -gt $off ]; then
      off=$c
      if [ -n "$stream" ]; then stream_stop; else poll_stop; fi
    fi
    before=$ends
    progress
    now=$(date +%s)
    [ $ends -gt $before ] && last=$now
    # Boot plus the first run, or one run: a guest silent for longer is stuck.
    if [ $((now - last)) -gt $((RUNTIME + 60 + (ends == 0) * 60)) ]; then
      hung=" (no progress for $((now - last)) s: killed)"
      kill $pid 2>/dev/null
    fi
    nap
  done
  wait $pid
  rc=$?
  progress
  [ -e poll.on ] && poll_stop
  [ -z "$stream" ] || stream_stop
  # A stream load's boot (its only configuration) is named after its load.
  case $confs in *:stream-*) p=$p.${confs##*:} ;; esac
  log="$OUT_DIR/console/$p${try:+.try$try}"
  cp run/debug.log "$log.debug.log" 2>/dev/null
  grep -v BENCH-NOISE console.log | tr -d '\r' > "$log.log"
  # A run's JSON counts once its end line came (a guest that dies mid-print leaves a .part).
  awk -v dir="$OUT_DIR/raw" -v round="$round" -v rounds="$ROUNDS" '
    /^BENCH-FIO-BEGIN /{f=dir "/" $2 (rounds == 1 ? "" : ".r" round) ".json"; next}
    /^BENCH-FIO-END /{if (f != "") {close(f ".part"); system("mv " f ".part " f)}; f=""; next}
    f != "" {print > (f ".part")}' "$log.log"
  # In one pass: each run's completion log (stream parts), "EPOCH_MS LAT_NS" per completion,
  # raw/TAG.lat; its guest block-layer figures (GUEST_TRACE=1), raw/TAG.gt.
  awk -v dir="$OUT_DIR/raw" -v round="$round" -v rounds="$ROUNDS" '
    { out = dir "/" $2 (rounds == 1 ? "" : ".r" round) }
    $1 == "BENCH-LAT" { gsub(",", ""); print $3, $4 > (out ".lat") }
    $1 == "BENCH-GT" && NF == 7 { print $3, $4, $5, $6, $7 > (out ".gt") }' "$log.log"
  # Each run's guest interrupts: /proc/interrupts just before fio and just after, summed over
  # the vCPUs, as "NAME DELTA" (NAME: the line's device, e.g. virtio0-req.1, or LOC, RES, CAL).
  awk -v dir="$OUT_DIR/raw" -v round="$round" -v rounds="$ROUNDS" '
    $1 !~ /^BENCH-IRQ[01]$/ {next}
    $3 ~ /^CPU/ {ncpu = NF - 2; next}
    { name = $3 ~ /^[0-9]+:$/ ? $NF : substr($3, 1, length($3) - 1)
      n = 0; for (i = 4; i < 4 + ncpu; i++) n += $i
      if ($1 == "BENCH-IRQ0") {b[$2, name] = n; next}
      f = dir "/" $2 (rounds == 1 ? "" : ".r" round) ".irq"
      print name, n - b[$2, name] > f }' "$log.log"
  grep -E 'BENCH-FIO-ERR|^vmm:|qemu-system' "$log.log" | head -5
  got=$(grep -c '^BENCH-FIO-END .* 0$' "$log.log")
  say "boot $vmm $place $image: exit $rc, $got/$n fio runs, $(($(date +%s) - start)) s$hung"
  rm -rf run
}

# run_boots VMM PLACE IMAGE ROUND CONFS: the boots that run CONFS: each stream load in one of its
# own (a stream leaves the chain flat, so each starts from a fresh copy), the other loads in one;
# $rc, $hung and $log are those of a boot that failed, if one did, else the last one's.
run_boots() {
  others="" streams="" frc=0 fhung="" flog=""
  for c in $5; do
    case $c in *:stream-*) streams="$streams $c" ;; *) others="$others $c" ;; esac
  done
  for b in ${others:+others} $streams; do
    [ "$b" = others ] && b=${others# }
    run_boot "$1" "$2" "$3" "$4" "$b"
    if [ "$got" -lt "$n" ] || [ "$rc" -ne 0 ]; then frc=$rc fhung=$hung flog=$log; fi
  done
  [ -z "$flog" ] || { rc=$frc hung=$fhung log=$flog; }
}

# missing P ROUND CONFS: those of CONFS without a result for boot P in ROUND.
missing() {
  for c in $3; do
    rw=${c%%:*}; r=${c#*:}; qd=${r%%:*}; ld=${r#*:}
    f="$OUT_DIR/raw/$1.$rw.qd$qd.$ld"
    [ "$ROUNDS" = 1 ] || f=$f.r$2
    grep -q '"jobs"' "$f.json" 2>/dev/null || printf '%s ' "$c"
  done
}

done_confs=0
writer="" stream=""
port=4440
status=0
round=$ROUND
for boot in $BOOTS; do
  vmm=${boot%%:*}; rest=${boot#*:}; place=${rest%%:*}; image=${rest#*:}
  try="" todo=$(missing "$vmm.$place.$image" $round "$CONFS")
  if [ -z "$todo" ]; then
    say "boot $vmm $place $image: done by an earlier attempt of this outer host"
    continue
  fi
  run_boots "$vmm" "$place" "$image" $round "$todo"
  for try in 2 3; do
    todo=$(missing "$vmm.$place.$image" $round "$CONFS")
    [ -n "$todo" ] || break
    why=$(grep -o 'triple fault.*' "$log.debug.log" 2>/dev/null | tail -1)
    say "RETRY $vmm $place $image round $round: exit $rc$hung, $(echo $todo | wc -w) configurations missing${why:+ ($why)}; console: $(tail -1 "$log.log")"
    run_boots "$vmm" "$place" "$image" $round "$todo"
  done
  if [ -n "$(missing "$vmm.$place.$image" $round "$CONFS")" ] || [ "$rc" -ne 0 ]; then status=1; fi
  sync
done
exit $status
