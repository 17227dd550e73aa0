# shellcheck shell=sh
# Block jobs under a running Linux guest, judged against QEMU: sourced by tests/disks/e2e.sh in the
# same host (it uses e2e.sh's check, ok, bad, has, b64 and sum; its QMP client is qmp.sh, beside
# it). The same QMP sequence runs under vmm and under QEMU (ci/qemu-baseline.args' microvm,
# virtio-blk-device), each on its own copy of the same images, in $DISK_DIR/jobs/{vmm,qemu}, each
# VMM started in that folder with relative names:
#   d0  on iothread io0, qcow2 chain base <- mid <- top (16 MiB, each layer pattern-filled by qemu-io)
#   d1  on the main loop, qcow2 chain b1 <- t1
#   ctl a raw disk on the main loop that only carries a number to the guest: its size in MiB less 1
#       is the "phase", grown by block_resize (the configuration-change interrupt tells the guest).
# The guest runs fio on d0 and on d1 all along, round after round: 4 KiB random writes over 512 KiB
# at offset 2 MiB (O_DIRECT, libaio, queue depth 8), then every block read back against its
# crc32c (--verify=crc32c, --verify_fatal); each round seeded with the phase it started in
# (--randseed, --randrepeat), so what a phase writes is the same under both VMMs, and what a later
# phase writes differs from it. The host, per phase: sets it, sends the steps' commands, waits for
# their jobs' end events, then for a round of that phase to finish on both disks (so the rounds
# overlap the jobs, and what the guest wrote during them is read back). The steps, by phase:
#   1 bad      block-stream of an unknown device, block-stream with a base not in d0's chain,
#              blockdev-snapshot-sync onto mid.qcow2 (in the chain: locked) in absolute-paths mode
#     snap1    blockdev-snapshot-sync d0 -> s1.qcow2
#     stream   block-stream d0 base=mid.qcow2 (top's data pulled into s1)
#   2 cancel   block-stream d0 at 256 KiB/s, block-commit d0 while it runs (a second job on a busy
#              disk), block-job-cancel once it has copied something
#   3 snap2    blockdev-snapshot-sync d0 -> s2.qcow2
#     commit   block-commit d0 top=s1.qcow2 base=mid.qcow2 (an intermediate layer)
#   4 active   block-commit d0 base=mid.qcow2 (the active layer): BLOCK_JOB_READY,
#              block-job-complete, the disk pivots onto mid.qcow2
#   5 pause    block-commit d1 (active, main loop) at 256 KiB/s, block-job-pause, block-stream d1
#              while paused (busy), block-job-resume, block-job-set-speed 0, ready, complete
#   6 a last phase is written and verified everywhere, the guest stops its fio and powers off.
# Checks per VMM: each reply's kind (return or error class), each job's BLOCK_JOB_* events,
# query-block's chain of file names after each step, fio's rounds; then between the VMMs: the
# same replies, events and chains, the chain files unchanged by the bad requests, qemu-img check
# clean on every image, qemu-img info --backing-chain of each disk's final top the same (names
# relative to each run's folder), and the disks' contents the same (qemu-img compare; where it
# differs, only in the 12 bytes of each 4 KiB fio block that fio fills from the clock: the
# header's time and its checksum, at offsets 24-31 and 36-39, are allowed to differ).
# JOBS_LOCAL=1: no guest (-S), for trying the QMP side on any host with KVM, busybox's nc and vmm on
# PATH: a folder D with jobs.sh, qmp.sh, ci/qemu-baseline.args and an empty file only-jobs, then
#   DISK_DIR=D GUEST_DIR=resources/cache/guest JOBS_LOCAL=1 sh tests/disks/e2e.sh
JD=$DISK_DIR/jobs
JOBS_STOP=50
. "$DISK_DIR/qmp.sh"

jobs_images() {
  mkdir -p "$1" && (
    cd "$1" || exit 1
    q() { qemu-io -f qcow2 "$@" > /dev/null; }
    qemu-img create -q -f qcow2 base.qcow2 16M
    q -c "write -P 0x11 0 8M" -c "write -P 0x14 12M 1M" base.qcow2
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
    q -c "write -P 0x22 3M 3M" -c "write -z 7M 1M" mid.qcow2
    qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
    q -c "write -P 0x33 1M 2M" -c "write -P 0x34 10M 3M" top.qcow2
    qemu-img create -q -f qcow2 b1.qcow2 16M
    q -c "write -P 0x41 0 12M" b1.qcow2
    qemu-img create -q -f qcow2 -b b1.qcow2 -F qcow2 t1.qcow2
    q -c "write -P 0x42 1M 5M" -c "write -P 0x43 9M 4M" t1.qcow2
    qemu-img create -q -f raw ctl.raw 1M
  )
}

# The guest: names its disks by serial, then fio rounds on d0 and d1 until the phase is JOBS_STOP,
# each round's end (the guest's uptime) kept in /tmp/DISK.at. Beside them its own watch, every
# 10 s: a heartbeat (GUEST-BEAT and its uptime; none coming means the guest's timers or scheduler
# stopped) and, for a disk whose round has not ended for 30 s, once, the state of its I/O: the
# requests in flight (reads, writes), the virtio and timer interrupts taken, and each fio
# process's state, wait channel and kernel stack (lines starting GUEST-STUCK). The script goes on
# the kernel's command line, base64-encoded, within its 2048 bytes (with room for --guest-append):
# hence its terse names. It says first where its kernel's text
# starts (GUEST-TEXT, from /proc/kallsyms: the kernel is relocated at random), so an instruction
# pointer the VMM shows can be looked up in the guest's vmlinux.
JOBS_GUEST=$(b64 'for d in /sys/block/vd*; do eval "v_$(cat $d/serial)=${d##*/}"; done
up() { cut -d. -f1 /proc/uptime; }
ph() { echo $(($(cat /sys/block/$v_ctl/size) / 2048 - 1)); }
run() {
  up > /tmp/$1.at
  while p=$(ph); [ $p -lt '"$JOBS_STOP"' ]; do
    fio --name=$1 --filename=/dev/$2 --direct=1 --ioengine=libaio --iodepth=8 --rw=randwrite \
--bs=4k --offset=2M --size=512K --verify=crc32c --verify_fatal=1 --randrepeat=1 --randseed=$p \
> /tmp/$1.txt 2>&1 || { echo GUEST-FIO-FAIL $1 $p; tail -20 /tmp/$1.txt; rm /tmp/$1.at; return; }
    echo GUEST-ROUND $1 $p
    up > /tmp/$1.at
  done
  rm /tmp/$1.at
  echo GUEST-FIO-OK $1
}
stuck() {
  echo "GUEST-STUCK $1: no round for $3 s, in flight $(cat /sys/block/$2/inflight)"
  grep -E "virtio|LOC" /proc/interrupts | sed "s/^/GUEST-STUCK /"
  for p in $(pidof fio); do
    echo "GUEST-STUCK fio $p $(cut -d" " -f3 /proc/$p/stat) $(cat /proc/$p/wchan)"
    sed "s/^/GUEST-STUCK $p /" /proc/$p/stack
  done
}
watch() {
  t=""
  while sleep 10; do
    n=$(up)
    echo GUEST-BEAT $n
    for d in d0 d1; do
      a=$(cat /tmp/$d.at 2>/dev/null) || continue
      eval v=\$v_$d
      case "$t" in *$d*) ;; *) [ $((n - a)) -lt 30 ] || { stuck $d $v $((n - a)); t="$t $d"; } ;; esac
    done
  done
}
echo GUEST-TEXT $(grep -m1 " _text$" /proc/kallsyms)
echo GUEST-JOBS-UP
watch & w=$!
run d0 $v_d0 & r=$!
run d1 $v_d1
wait $r
kill $w')

# stalled: whether the guest's fio rounds stopped: a disk whose fio goes on (neither GUEST-FIO-OK
# nor -FAIL) has had no new round for JOBS_STALL s (by the host's clock, counted from the guest's
# boot marker; rounds take seconds, but one was waited for 63 s in a passing run at a load of 6 on
# 2 cores, while a stalled guest never resumed in 10 minutes; 120 s is what each phase waits for
# its rounds anyway, so no run that would pass fails here). Checked every few calls (the waits call it at each nap); the
# first time it holds it says so in one line, prints the stalled guest's state (stall_state) and
# then holds for the rest of the run, which every step below skips, so the run ends at once (its
# checks failing: no GUEST-FIO-OK). Keeps in $longest the longest a round was waited for (to the
# second or so: rounds that came while no wait was checking count when the next one checks), said
# at the end of each run. Needs seen0, seen1, at0, at1, longest and stall set by jobs_run.
JOBS_STALL=120
stalled() {
  [ -z "$stall" ] || return 0
  [ -z "${JOBS_LOCAL:-}" ] || return 1
  tick=$((tick + 1))
  [ $((tick % 5)) = 0 ] || return 1
  now=$(date +%s)
  n=$(grep -c "GUEST-ROUND d0 " console.log)
  [ "$n" = "$seen0" ] || { waited d0 $((now - at0)) "$n"; seen0=$n at0=$now; }
  n=$(grep -c "GUEST-ROUND d1 " console.log)
  [ "$n" = "$seen1" ] || { waited d1 $((now - at1)) "$n"; seen1=$n at1=$now; }
  for d in d0 d1; do
    has console.log "GUEST-FIO-[A-Z]* $d" && continue
    if [ $d = d0 ]; then at=$at0 other=d1 other_at=$at1; else at=$at1 other=d0 other_at=$at0; fi
    [ $((now - at)) -ge $JOBS_STALL ] || continue
    stall="no fio round on $d for $((now - at)) s after round $(last_round $d) ($other: round $(last_round $other), $((now - other_at)) s ago)"
    echo "E2E-NOTE jobs-$run: inner guest under $run stalled: $stall"
    stall_state
    return 0
  done
  return 1
}
# waited DISK SECONDS N: DISK's round N came after SECONDS; kept in $longest (and which round in
# $longest_at) if no round was waited for longer.
waited() {
  [ "$2" -gt "$longest" ] || return 0
  longest=$2 longest_at="on $1: its round $3, of phase $(last_round "$1")"
}
# last_round DISK: the phase of DISK's last fio round ("none" before the first).
last_round() { r=$(grep "GUEST-ROUND $1 " console.log | tail -1 | cut -d' ' -f3); echo "${r:-none}"; }
# stall_state: the stalled guest's state, to tell a halted guest from a spinning one and a lost
# interrupt from a lost request: the guest's last console lines (with its own watch's GUEST-BEAT
# and GUEST-STUCK lines), the VMM's run state and block statistics over QMP (and under QEMU its
# vCPUs' registers, whose HLT says halted, and local APICs, whose IRR holds what is pending), and,
# over 2 s, each of the VMM's threads' state, wait channel and CPU time (a vCPU thread in
# kvm_vcpu_block is halted), this host's KVM counters for the VM (debugfs) and its kvm trace events
# counted (exits by reason, interrupts injected, timers).
stall_state() {
  echo "--- jobs-$run: the stalled guest's state"
  echo "guest kernel text: $(grep -m1 GUEST-TEXT console.log)"
  echo "console (last 25 lines):"
  tail -n 25 console.log
  dbg=/sys/kernel/debug
  [ -d $dbg/kvm ] || mount -t debugfs debugfs $dbg 2>/dev/null
  kvm=$(find $dbg/kvm -maxdepth 1 -name "$vm_pid-*" 2>/dev/null | head -1)
  tr=$dbg/tracing
  stall_qmp
  stall_sample > stall.before
  if [ -d $tr/events/kvm ]; then
    echo 8192 > $tr/buffer_size_kb; : > $tr/trace; echo 1 > $tr/events/kvm/enable
  fi
  sleep 2
  [ -d $tr/events/kvm ] && echo 0 > $tr/events/kvm/enable
  stall_sample > stall.after
  echo "threads and KVM counters over 2 s (name, state, wait channel, CPU ticks; counter: change, value):"
  awk 'NR == FNR { b[$1] = $NF; next }
    $1 ~ /^thread/ { print $0 " +" ($NF - b[$1]) " ticks"; next }
    $NF != b[$1] { print $1 ": +" ($NF - b[$1]) " (" $NF ")"; c++ }
    END { if (!c) print "kvm: no counter changed" }' stall.before stall.after
  for t in /proc/"$vm_pid"/task/*; do
    case $(cat "$t/comm") in vcpu* | CPU*) echo "$(cat "$t/comm") kernel stack:"; head -n 8 "$t/stack";; esac
  done
  if [ -d $tr/events/kvm ]; then
    echo "kvm events in 2 s:"
    sed -n 's/.*: \(kvm_[a-z_]*\): .*/\1/p' $tr/trace | sort | uniq -c
    echo "kvm exits by reason:"
    sed -n 's/.*kvm_exit: .*reason \([A-Za-z_0-9]*\).*/\1/p' $tr/trace | sort | uniq -c
    echo "last kvm events other than exits and entries:"
    grep -v 'kvm_exit:\|kvm_entry:\|^#' $tr/trace | tail -n 20
    : > $tr/trace
  fi
  stall_qmp
  echo "--- jobs-$run: end of the stalled guest's state"
}
# stall_sample: the VMM's threads (tid:name state wchan ticks) and the VM's KVM counters, a line each.
stall_sample() {
  for t in /proc/"$vm_pid"/task/*; do
    echo "thread${t##*/}:$(tr ' ' _ < "$t/comm") $(sed 's/.*) //' "$t/stat" | awk '{print $1}') $(cat "$t/wchan") $(sed 's/.*) //' "$t/stat" | awk '{print $12 + $13}')"
  done
  [ -z "$kvm" ] || for f in "$kvm"/*; do [ -f "$f" ] && echo "kvm:${f##*/} $(cat "$f" 2>/dev/null)"; done
}
# stall_qmp: the VMM's run state and each disk's request counts; under QEMU, every vCPU's
# general registers (HLT=1: halted) and both local APICs. Nothing once the monitor is closed or silent.
stall_qmp() {
  [ -n "$qmp_up" ] || return 0
  qmp_cmd '{"execute":"query-status"}'
  echo "query-status: ${reply:-no reply}"
  [ -n "$reply" ] || return 0
  qmp_cmd '{"execute":"query-blockstats"}'
  echo "query-blockstats: $(echo "$reply" | grep -o '"device": "[^"]*"\|"[rw][dr]_operations": [0-9]*' | tr '\n' ' ')"
  [ "$run" = qemu ] || return 0
  for c in "info registers -a" "info lapic 0" "info lapic 1"; do
    qmp_cmd "{\"execute\":\"human-monitor-command\",\"arguments\":{\"command-line\":\"$c\"}}"
    echo "$c:"
    # The general registers and CR0 of the registers' dump (not the segments, FPU, vectors).
    echo "$reply" | sed 's/\\r\\n/\n/g; s/\\t/ /g' | grep -Ev '^(ES|CS|SS|DS|FS|GS|LDT|TR|GDT|IDT|DR[0-9]|FCW|FPR[0-9]|YMM[0-9]*|XMM[0-9]*)[ =]'
    for r in $(echo "$reply" | grep -o 'RIP=[0-9a-f]*'); do echo "$r is in $(where "${r#RIP=}")"; done
  done
}
# where ADDR: the guest's instruction pointer ADDR as SYMBOL+OFFSET, looked up in this host's
# /proc/kallsyms: the host runs the guest's kernel (the same bzImage), relocated elsewhere, and
# GUEST-TEXT says where the guest's text starts. Both lie in the top 2 GiB, so the low 32 bits do.
where() {
  case $1 in
    ffffffff[89ab]*) ;;
    ffffffff*) echo "a module"; return ;;
    *) echo "user space"; return ;;
  esac
  gt=$(grep -m1 GUEST-TEXT console.log | cut -d' ' -f2)
  ht=$(grep -m1 ' _text$' /proc/kallsyms | cut -d' ' -f1)
  [ -n "$gt" ] && [ -n "$ht" ] || { echo "?"; return; }
  a=$(printf 'ffffffff%08x' $(((0x${1#ffffffff} - 0x${gt#ffffffff} + 0x${ht#ffffffff}) & 0xffffffff)))
  awk -v a="$a" 'NF == 3 && $1 <= a && $1 > b { b = $1; s = $3 } END { print s, b }' /proc/kallsyms | {
    read -r s b; echo "$s+0x$(printf %x $((0x${a#ffffffff} - 0x${b#ffffffff})))"; }
}
# go: no stall seen in this run (every step and wait below starts with it).
go() { [ -z "$stall" ]; }

# ask NAME JSON: sends JSON, puts "NAME: kind" in the trace.
ask() { go || return 0; qmp_cmd "$2"; echo "$1: $(kind)" >> trace; }
# until_event JOB EVENT: waits (120 s at most) for JOB's EVENT; puts the job's events in the trace.
until_event() {
  go || return 0
  i=0
  until events "$1" | grep -q "$2" || stalled || [ $i -ge 600 ]; do nap; i=$((i + 1)); done
  echo "$1 events: $(events "$1")" >> trace
}
# until_job JOB STATUS: waits (60 s at most) until query-block-jobs shows JOB with STATUS and
# some progress; says so in the trace.
until_job() {
  go || return 0
  i=0
  while [ $i -lt 300 ]; do
    qmp_cmd '{"execute":"query-block-jobs"}'
    echo "$reply" | grep -q "\"status\": \"$2\"" && ! echo "$reply" | grep -q '"offset": 0[,}]' && break
    stalled && return 0
    nap; i=$((i + 1))
  done
  echo "$1 seen $2 with progress: $([ $i -lt 300 ] && echo yes || echo no)" >> trace
}
# values KEY: the values of KEY in $reply, sorted (QEMU's members come in no fixed order).
values() { echo "$reply" | grep -o "\"$1\": [^,}]*" | sed "s/\"$1\": //" | sort | tr '\n' ' '; }
# chain STEP: query-block's disks in the trace: the tops, their depths, every image of the chains
# and the backing names they hold.
chain() {
  go || return 0
  qmp_cmd '{"execute":"query-block"}'
  echo "$1 chain: tops $(values file)depths $(values backing_file_depth)images $(values filename)backing names $(values backing-filename)" >> trace
}
# phase N: the guest's next fio rounds write with seed N.
phase() {
  go || return 0
  cur_phase=$1
  echo "E2E-NOTE jobs-$run: phase $1 at $(($(date +%s) - start)) s"
  qmp_cmd "{\"execute\":\"block_resize\",\"arguments\":{\"device\":\"ctl\",\"size\":$((($1 + 1) * 1048576))}}"
  echo "phase $1: $(kind)" >> trace
}
# rounds: waits (120 s at most) for a round of the current phase to finish on both disks.
rounds() {
  [ -n "${JOBS_LOCAL:-}" ] && return 0
  go || return 0
  i=0
  until { has console.log "GUEST-ROUND d0 $cur_phase" && has console.log "GUEST-ROUND d1 $cur_phase"; } ||
    has console.log GUEST-FIO-FAIL || stalled || [ $i -ge 600 ]; do nap; i=$((i + 1)); done
  echo "phase $cur_phase rounds: $(has console.log "GUEST-ROUND d0 $cur_phase" && echo d0) $(has console.log "GUEST-ROUND d1 $cur_phase" && echo d1)" >> trace
}

# jobs_sequence: the steps, on the open monitor; a phase per job.
jobs_sequence() {
  chain start
  sum mid.qcow2 > mid.sum.before
  phase 1
  ask bad-device '{"execute":"block-stream","arguments":{"device":"nope","job-id":"x0"}}'
  ask bad-base '{"execute":"block-stream","arguments":{"device":"d0","job-id":"x1","base":"nope.qcow2"}}'
  ask bad-snapshot-onto-chain '{"execute":"blockdev-snapshot-sync","arguments":{"device":"d0","snapshot-file":"mid.qcow2","format":"qcow2","mode":"absolute-paths"}}'
  chain bad
  sum mid.qcow2 > mid.sum.after
  ask snap1 '{"execute":"blockdev-snapshot-sync","arguments":{"device":"d0","snapshot-file":"s1.qcow2","format":"qcow2"}}'
  chain snap1
  ask stream '{"execute":"block-stream","arguments":{"device":"d0","job-id":"st","base":"mid.qcow2"}}'
  until_event st BLOCK_JOB_COMPLETED
  chain stream
  rounds
  phase 2
  ask cancel '{"execute":"block-stream","arguments":{"device":"d0","job-id":"cx","speed":262144}}'
  until_job cx running
  ask busy-disk '{"execute":"block-commit","arguments":{"device":"d0","job-id":"x2"}}'
  ask cancel-cancel '{"execute":"block-job-cancel","arguments":{"device":"cx"}}'
  until_event cx BLOCK_JOB_CANCELLED
  chain cancel
  rounds
  phase 3
  ask snap2 '{"execute":"blockdev-snapshot-sync","arguments":{"device":"d0","snapshot-file":"s2.qcow2","format":"qcow2"}}'
  chain snap2
  ask commit '{"execute":"block-commit","arguments":{"device":"d0","job-id":"ci","top":"s1.qcow2","base":"mid.qcow2"}}'
  until_event ci BLOCK_JOB_COMPLETED
  chain commit
  rounds
  phase 4
  ask active '{"execute":"block-commit","arguments":{"device":"d0","job-id":"ac","base":"mid.qcow2"}}'
  until_event ac BLOCK_JOB_READY
  ask active-complete '{"execute":"block-job-complete","arguments":{"device":"ac"}}'
  until_event ac BLOCK_JOB_COMPLETED
  chain active
  rounds
  phase 5
  ask pause '{"execute":"block-commit","arguments":{"device":"d1","job-id":"pr","speed":262144}}'
  until_job pr running
  ask pause-pause '{"execute":"block-job-pause","arguments":{"device":"pr"}}'
  until_job pr paused
  ask pause-busy '{"execute":"block-stream","arguments":{"device":"d1","job-id":"x3"}}'
  ask pause-resume '{"execute":"block-job-resume","arguments":{"device":"pr"}}'
  ask pause-speed '{"execute":"block-job-set-speed","arguments":{"device":"pr","speed":0}}'
  until_event pr BLOCK_JOB_READY
  ask pause-complete '{"execute":"block-job-complete","arguments":{"device":"pr"}}'
  until_event pr BLOCK_JOB_COMPLETED
  chain pause
  rounds
  phase 6
  rounds
  go || return 0
  qmp_cmd '{"execute":"query-block"}'
  values file | tr -d '"' > final-tops
  phase $JOBS_STOP
}

# jobs_run NAME PORT COMMAND...: the sequence on a fresh copy of the images in $JD/NAME under
# COMMAND, its monitor on PORT.
jobs_run() {
  run=$1 JOBS_PORT=$2; shift 2
  rm -rf "${JD:?}/$run" && cp -r "$JD/images" "$JD/$run" && cd "$JD/$run" || return
  : > trace; : > qmp.log
  start=$(date +%s)
  if [ -n "${JOBS_LOCAL:-}" ]; then set -- "$@" -S; fi
  cmdline="$APPEND guest.sh=$JOBS_GUEST guest.run=poweroff"
  # Linux keeps 2047 bytes of its command line: vmm refuses a longer one, QEMU boots it into a
  # silent hang in the kernel's first steps.
  [ ${#cmdline} -lt 2048 ] || bad "jobs-$run-command-line-of-${#cmdline}-bytes"
  "$@" -m 512M -smp 2 -kernel "$G/bzImage" -initrd "$G/initrd-fio.img" -object iothread,id=io0 \
    -drive file=top.qcow2,format=qcow2,if=none,id=d0,cache=none \
    -device virtio-blk-device,drive=d0,id=v0,iothread=io0,serial=d0 \
    -drive file=t1.qcow2,format=qcow2,if=none,id=d1,cache=none \
    -device virtio-blk-device,drive=d1,id=v1,serial=d1 \
    -drive file=ctl.raw,format=raw,if=none,id=ctl,cache=none \
    -device virtio-blk-device,drive=ctl,id=vc,serial=ctl \
    -qmp tcp:127.0.0.1:$JOBS_PORT,server=on,wait=off \
    -append "$cmdline" < /dev/null > console.log 2>&1 &
  vm_pid=$!
  if [ -z "${JOBS_LOCAL:-}" ]; then
    i=0
    echo "E2E-NOTE jobs-$run: booting"
    until has console.log GUEST-JOBS-UP || ! kill -0 $vm_pid 2>/dev/null || [ $i -ge 750 ]; do nap; i=$((i + 1)); done
    has console.log GUEST-JOBS-UP || { bad "jobs-$run-guest-up"; tail -30 console.log; }
  fi
  stall="" tick=0 seen0=0 seen1=0 at0=$(date +%s) at1=$(date +%s) longest=0 longest_at=""
  qmp_up=""
  if qmp_open $JOBS_PORT; then
    qmp_up=1
    # A guest that is there but never started its fio: its state, and no steps.
    if [ -z "${JOBS_LOCAL:-}" ] && ! has console.log GUEST-JOBS-UP && kill -0 $vm_pid 2>/dev/null; then
      stall="not up"
      echo "E2E-NOTE jobs-$run: inner guest under $run stalled: not up within 150 s"
      stall_state
    fi
    jobs_sequence
    [ -n "${JOBS_LOCAL:-}" ] && qmp_cmd '{"execute":"quit"}'
    qmp_close
    qmp_up=""
  else
    bad "jobs-$run-monitor"
  fi
  i=0
  while kill -0 $vm_pid 2>/dev/null && ! stalled && [ $i -lt 600 ]; do nap; i=$((i + 1)); done
  kill $vm_pid 2>/dev/null
  wait $vm_pid
  rc=$?
  echo "E2E-TIME jobs-$run $(($(date +%s) - start)) s rc=$rc"
  [ -n "${JOBS_LOCAL:-}" ] || echo "E2E-NOTE jobs-$run: fio rounds: $seen0 on d0, $seen1 on d1, the longest waited for $longest s ($longest_at)"
  check "jobs-$run-exit-0" [ "$rc" = 0 ]
  if [ -z "${JOBS_LOCAL:-}" ]; then
    check "jobs-$run-fio-d0" has console.log "GUEST-FIO-OK d0"
    check "jobs-$run-fio-d1" has console.log "GUEST-FIO-OK d1"
    has console.log GUEST-FIO-FAIL && grep -A20 GUEST-FIO-FAIL console.log | head -40
    has console.log "GUEST-FIO-OK d1" || tail -30 console.log
  fi
  check "jobs-$run-bad-requests-leave-mid" cmp -s mid.sum.before mid.sum.after
  for f in *.qcow2; do check "jobs-$run-check-$f" qemu-img check -q "$f"; done
  echo "--- jobs-$run: trace"
  cat trace
  cd "$JD" || return
}

# same NAME FILE: the runs' FILE are the same.
same() { check "jobs-same-$1" cmp "$JD/vmm/$2" "$JD/qemu/$2"; }
# fio_only A B: A and B (both there) differ only in fio's clock-filled header bytes (each
# differing byte at an offset in its 4 KiB block of 24-31 or 36-39).
fio_only() {
  [ -f "$1" ] && [ -f "$2" ] || return 1
  cmp -l "$1" "$2" | awk '{ o = ($1 - 1) % 4096; if (o < 24 || (o > 31 && o < 36) || o > 39) bad++; n++ }
    END { print "E2E-NOTE jobs content: " n + 0 " bytes differ, " bad + 0 " outside fio headers'"'"' clock bytes"; exit (bad > 0) }'
}

jobs_all() {
  rm -rf "${JD:?}" && jobs_images "$JD/images" || { bad jobs-images; return; }
  jobs_run vmm 4460 vmm
  jobs_run qemu 4461 $(grep -v '^#' "$JOBS_QEMU_ARGS" | tr '\n' ' ')
  same trace trace
  same final-tops final-tops
  # Each disk's final top under either VMM (the same files when they agree), side by side.
  for f in $(cat "$JD/vmm/final-tops" "$JD/qemu/final-tops" | tr ' ' '\n' | sort -u); do
    for run in vmm qemu; do
      (cd "$JD/$run" && qemu-img info --backing-chain "$f" |
        grep -E '^(image|file format|virtual size|backing file|backing file format):' > "info-$f")
    done
    same "info-$f" "info-$f"
    if qemu-img compare -q "$JD/vmm/$f" "$JD/qemu/$f"; then ok "jobs-same-content-$f"; continue; fi
    for run in vmm qemu; do
      rm -f "$JD/$run/content.raw"
      qemu-img convert -O raw "$JD/$run/$f" "$JD/$run/content.raw"
    done
    check "jobs-same-content-$f" fio_only "$JD/vmm/content.raw" "$JD/qemu/content.raw"
  done
  diff "$JD/vmm/trace" "$JD/qemu/trace" | head -40
  rm -f "$JD"/*/content.raw
  cd "$DISK_DIR" || return
}
