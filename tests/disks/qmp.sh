# shellcheck shell=sh
# A QMP client in POSIX sh (busybox: nc, grep, sed), for hosts without Python (the nested host):
# sourced by tests/disks/jobs.sh and by ci/demo --chain-ops. One connection to a monitor on
# -qmp tcp:127.0.0.1:PORT; what it sends goes through the FIFO q.in, everything the monitor says
# (greeting, replies, events) lands in q.out in the working folder. Its names start with qmp_
# where a caller's could clash (e2e.sh has its own qmp). Commands go one at a time:
# a command's reply is the next line of q.out that is no event. Each command and its reply are
# appended to $QMP_LOG (default qmp.log; "-": standard output) as "> COMMAND" and "< REPLY".
nap() { sleep 0.2 2>/dev/null || sleep 1; }

# qmp_open PORT: connects (retrying for a minute while nothing listens), negotiates capabilities.
qmp_open() {
  tries=0
  while :; do
    rm -f q.in && mkfifo q.in && : > q.out
    nc 127.0.0.1 "$1" < q.in > q.out 2>/dev/null &
    nc_pid=$!
    exec 3> q.in
    i=0
    until grep -q '"QMP"' q.out || ! kill -0 $nc_pid 2>/dev/null || [ $i -ge 25 ]; do nap; i=$((i + 1)); done
    grep -q '"QMP"' q.out && break
    exec 3>&-
    kill $nc_pid 2>/dev/null; wait $nc_pid 2>/dev/null
    tries=$((tries + 1))
    [ $tries -lt 60 ] || return 1
    sleep 1
  done
  qn=1
  qmp_cmd '{"execute":"qmp_capabilities"}'
}
qmp_close() { exec 3>&-; kill $nc_pid 2>/dev/null; wait $nc_pid 2>/dev/null || :; }

# qmp_cmd JSON: sends a command and waits (30 s at most) for its reply, left in $reply ("" if
# none came).
qmp_cmd() {
  echo "$1" >&3
  qn=$((qn + 1))
  i=0
  reply=""
  while [ $i -lt 150 ]; do
    # Complete lines only: nc may have written part of the last one.
    reply=$(head -n "$(wc -l < q.out)" q.out | grep -v '"event"' | sed -n "${qn}p")
    [ -n "$reply" ] && break
    nap; i=$((i + 1))
  done
  if [ "${QMP_LOG:-}" = - ]; then printf '> %s\n< %s\n' "$1" "$reply"
  else printf '> %s\n< %s\n' "$1" "$reply" >> "${QMP_LOG:-qmp.log}"; fi
}

# kind: $reply's kind, "return" or "error CLASS" ("no reply" if none came).
kind() {
  case $reply in
    *'"return"'*) echo return ;;
    *'"error"'*) echo "error $(echo "$reply" | sed 's/.*"class": "\([A-Za-z]*\)".*/\1/')" ;;
    *) echo "no reply" ;;
  esac
}

# job_events JOB: JOB's BLOCK_JOB_* events so far, one a line, without their timestamps.
job_events() {
  grep '"event": "BLOCK_JOB_' q.out | grep "\"device\": \"$1\"" | sed 's/"timestamp": {[^}]*}, *//; s/, *"timestamp": {[^}]*}//'
}
# events JOB: the names of JOB's BLOCK_JOB_* events so far, space-separated.
events() { job_events "$1" | sed 's/.*"event": "\([A-Z_]*\)".*/\1/' | tr '\n' ' '; }
# wait_event JOB EVENT: waits (120 s at most) for JOB's EVENT; fails if it did not come.
wait_event() {
  i=0
  while ! events "$1" | grep -q "$2"; do
    [ $i -lt 600 ] || return 1
    nap; i=$((i + 1))
  done
}
