#!/bin/sh
# ci/chain-ops's walk-through in POSIX sh, for hosts without Python (the nested host, where
# `ci/demo --chain-ops` runs it on the demo guest's disk): the same commands in the same order over
# a monitor on -qmp tcp:127.0.0.1:PORT, with the QMP client of tests/disks/qmp.sh (found beside
# this script, else in tests/disks/, or at $QMP_SH). Printed: each command and its reply, the
# job's events (without timestamps), the chain after each step, and `qemu-img info -U
# --backing-chain` of the disk's top before and after (qemu-img: vmm-img is not in that host).
#
# Usage: sh ci/chain-ops.sh PORT DEVICE   (run in a folder it may write q.in and q.out into)
# On a disk whose chain is TOP -> ... -> BOTTOM:
#   1. blockdev-snapshot-sync: a new overlay snap-1.qcow2 on top (next to TOP);
#   2. block-stream down to BOTTOM: snap-1 holds everything above BOTTOM;
#   3. blockdev-snapshot-sync: snap-2.qcow2 on top of snap-1;
#   4. block-commit of the intermediate snap-1 into BOTTOM;
#   5. block-commit of the active layer snap-2 into BOTTOM: BLOCK_JOB_READY, block-job-complete,
#      and the disk runs on BOTTOM alone.
# Exits non-zero if a command fails, a job ends otherwise than completed, or the disk does not end
# on BOTTOM alone.
set -u
[ $# = 2 ] || { echo "usage: sh ci/chain-ops.sh PORT DEVICE" >&2; exit 2; }
port=$1 device=$2
here=$(dirname "$0")
for f in "${QMP_SH:-}" "$here/qmp.sh" "$here/../tests/disks/qmp.sh"; do
  [ -n "$f" ] && [ -f "$f" ] && { . "$f"; break; }
done
command -v qmp_open > /dev/null || { echo "chain-ops: no qmp.sh" >&2; exit 2; }
QMP_LOG=-

die() { echo "chain-ops: $*" >&2; qmp_close; exit 1; }
# run JSON: the command, its reply printed; fails unless it returned.
run() { qmp_cmd "$1"; [ "$(kind)" = return ] || die "the command failed"; }
# disk_top: sets $top to the file DEVICE runs on, from query-block (its entry cut out of the list
# by brace depth). Not in a subshell: the client counts its replies.
disk_top() {
  QMP_LOG=/dev/null
  qmp_cmd '{"execute":"query-block"}'
  QMP_LOG=-
  top=$(echo "$reply" | awk '{
    d = 0; s = 0; e = ""
    for (i = 1; i <= length($0); i++) {
      c = substr($0, i, 1)
      if (s) { if (c == "\\") { e = e c; i++; c = substr($0, i, 1) } else if (c == "\"") s = 0 }
      else if (c == "\"") s = 1
      else if (c == "{") d++
      else if (c == "}") d--
      if (d >= 2 || (d == 1 && c == "}")) e = e c
      if (d == 1 && c == "}") { print e; e = "" }
    }
  }' | grep "\"device\": \"$device\"" | sed -n 's/.*"file": "\([^"]*\)".*/\1/p' | head -1)
}
# images TOP: the chain's files, top first, one a line.
images() { qemu-img info -U --backing-chain "$1" | sed -n 's/^image: //p'; }
show_chain() { disk_top; echo "# $device: $(images "$top" | sed 's|.*/||' | tr '\n' ' ' | sed 's/ $//; s/ / -> /g')"; }
# job ID EVENT: waits for the job's EVENT, printing its events; fails on an error or a cancel.
job() {
  wait_event "$1" "$2" || die "no $2 for job $1"
  job_events "$1" | tail -n +$((shown + 1)) | sed 's/^/< /'
  shown=$(job_events "$1" | wc -l)
  ! job_events "$1" | grep -q '"error"\|BLOCK_JOB_ERROR\|BLOCK_JOB_CANCELLED' || die "job $1 failed"
}
# step ID EVENT JSON: a job's command, then its events until EVENT.
step() { shown=0; run "$3"; job "$1" "$2"; }

qmp_open "$port" > /dev/null || { echo "chain-ops: no monitor on port $port" >&2; exit 1; }
disk_top
[ -n "$top" ] || die "no disk $device"
dir=$(dirname "$top")
echo "\$ qemu-img info -U --backing-chain $top"
qemu-img info -U --backing-chain "$top"
run "{\"execute\":\"blockdev-snapshot-sync\",\"arguments\":{\"device\":\"$device\",\"snapshot-file\":\"$dir/snap-1.qcow2\",\"format\":\"qcow2\"}}"
show_chain
bottom=$(images "$top" | tail -1)
step stream0 BLOCK_JOB_COMPLETED "{\"execute\":\"block-stream\",\"arguments\":{\"device\":\"$device\",\"job-id\":\"stream0\",\"base\":\"$bottom\"}}"
show_chain
run "{\"execute\":\"blockdev-snapshot-sync\",\"arguments\":{\"device\":\"$device\",\"snapshot-file\":\"$dir/snap-2.qcow2\",\"format\":\"qcow2\"}}"
show_chain
step commit0 BLOCK_JOB_COMPLETED "{\"execute\":\"block-commit\",\"arguments\":{\"device\":\"$device\",\"job-id\":\"commit0\",\"top\":\"$dir/snap-1.qcow2\",\"base\":\"$bottom\"}}"
show_chain
step commit1 BLOCK_JOB_READY "{\"execute\":\"block-commit\",\"arguments\":{\"device\":\"$device\",\"job-id\":\"commit1\"}}"
run '{"execute":"block-job-complete","arguments":{"device":"commit1"}}'
job commit1 BLOCK_JOB_COMPLETED
show_chain
[ "$(images "$top")" = "$bottom" ] || die "the disk does not run on $bottom alone"
echo "\$ qemu-img info -U --backing-chain $top"
qemu-img info -U --backing-chain "$top"
qmp_close
