"""Tests of inner.sh's guest script on the kernel's command line (python3 -m unittest, run by
ci/unit): the script runs as its inner half does, in sh, on the plans ci/bench-latency makes."""

import base64
import os
import subprocess
import tempfile
import unittest

INNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "inner.sh")
# What the kernel takes (its setup header's cmdline_size, 2047 on x86), and the rest of the line
# run_boot gives it beside guest.sh=.
KERNEL_CMDLINE_MAX = 2047
APPEND = "console=ttyS0 quiet guest.sh={} guest.run=poweroff"
# The default matrix's configurations of one boot, each on a line of its own.
MATRIX = " ".join(f"{rw}:{qd}:{load}" for rw in ("randread", "randwrite") for qd in (1, 32)
                  for load in ("quiet", "disturbed"))


def guest_script(vars_line, confs):
    """inner.sh's guest_script VARS CONFS, run in sh with its guest_body."""
    with open(INNER, encoding="utf-8") as f:
        text = f.read()
    start = text.index("guest_body='")
    end = text.index("\n}\n", text.index("guest_script() {")) + 3
    out = subprocess.run(["sh", "-c", text[start:end] + 'guest_script "$1" "$2"', "sh",
                          vars_line, confs], check=True, capture_output=True, text=True)
    return out.stdout


def plan(confs, p="vmm-nosandbox.iothread+pci+per-queue+nopoll+aio-io_uring.chain3", nj=2):
    return f'P={p} RT=10 NJ={nj} CONFS="{confs}"'


class GuestScript(unittest.TestCase):
    def test_the_longest_plans_fit_the_kernel_command_line(self):
        for confs in (MATRIX, "randread:32:quiet", "randwrite:1:fsync-writer",
                      "randread:1:stream-full"):
            line = APPEND.format(guest_script(plan(confs), confs))
            self.assertLessEqual(len(line), KERNEL_CMDLINE_MAX, confs)

    def test_a_load_the_boot_does_not_run_is_left_out_and_the_rest_stays(self):
        confs = "randread:32:quiet"
        script = base64.b64decode(guest_script(plan(confs), confs)).decode()
        self.assertTrue(script.startswith(plan(confs) + "\n"))
        for gone in ("disturbed", "fsync-writer", "stream-"):
            self.assertNotIn(gone, script)
        for kept in ("fio --eta=never", "BENCH-FIO-BEGIN", "BENCH-IRQ", "BENCH-GUEST-DONE"):
            self.assertIn(kept, script)
        # Still a whole script (if/fi, case/esac, do/done balanced).
        subprocess.run(["sh", "-n", "-c", script], check=True)

    def test_the_loads_a_boot_runs_keep_their_lines(self):
        for confs, kept in (("randread:1:disturbed", ["BENCH-NOISE", "kill $s1 $s2"]),
                            ("randread:1:fsync-writer", ["--fsync=1"]),
                            ("randread:1:stream-10M", ["BENCH-LOAD-ON", "BENCH-LOAD-OFF"])):
            script = base64.b64decode(guest_script(plan(confs), confs)).decode()
            for line in kept:
                self.assertIn(line, script, confs)
            subprocess.run(["sh", "-n", "-c", script], check=True)

    def test_the_guest_trace_fits_beside_every_quiet_plan_and_goes_without_it(self):
        quiet = " ".join(f"{rw}:{qd}:quiet" for rw in ("randread", "randwrite") for qd in (1, 32))
        for confs in (quiet, "randread:32:quiet"):
            traced = guest_script(plan(confs) + " GT=1", confs)
            self.assertLessEqual(len(APPEND.format(traced)), KERNEL_CMDLINE_MAX, confs)
            script = base64.b64decode(traced).decode()
            self.assertEqual(script.count('[ -z "$GT" ]'), 3)
            subprocess.run(["sh", "-n", "-c", script], check=True)
            script = base64.b64decode(guest_script(plan(confs), confs)).decode()
            self.assertNotIn("$GT", script)

    def test_the_guest_trace_sums_up_each_request_from_queued_to_completed(self):
        confs = "randread:32:quiet"
        script = base64.b64decode(guest_script(plan(confs) + " GT=1", confs)).decode()
        summary = next(line for line in script.splitlines()
                       if line.startswith('[ -z "$GT" ]||awk'))
        # Three reads as the kernel's trace file shows them (another request's events between
        # each one's), two completed: 10 + 400 µs and 20 + 3,000 µs; the third never completes.
        events = [("fio-80", "001", "100.000100", "block_bio_queue", "254,0 R 2048 + 8 [fio]"),
                  ("fio-81", "002", "100.000110", "block_bio_queue", "254,0 R 4096 + 8 [fio]"),
                  ("fio-80", "001", "100.000110", "block_rq_issue",
                   "254,0 R 4096 () 2048 + 8 none,0,0 [fio]"),
                  ("fio-81", "002", "100.000130", "block_rq_issue",
                   "254,0 R 4096 () 4096 + 8 none,0,0 [fio]"),
                  ("fio-80", "001", "100.000200", "block_bio_queue", "254,0 R 8192 + 8 [fio]"),
                  ("<idle>-0", "000", "100.000510", "block_rq_complete",
                   "254,0 R () 2048 + 8 none,0,0 [0]"),
                  ("<idle>-0", "000", "100.003130", "block_rq_complete",
                   "254,0 R () 4096 + 8 none,0,0 [0]")]
        with tempfile.TemporaryDirectory() as tracing:
            with open(os.path.join(tracing, "trace"), "w", encoding="utf-8") as f:
                f.write("# tracer: nop\n#\n")
                for task, cpu, at, event, fields in events:
                    f.write(f"{task:>16} [{cpu}] ..... {at:>12}: {event}: {fields}\n")
            out = subprocess.run(["sh", "-c", f"GT=1 T={tracing} t=TAG; {summary}"],
                                 check=True, capture_output=True, text=True).stdout.split()
        self.assertEqual(out[:3], ["BENCH-GT", "TAG", "2"])
        # Means of before the driver and at the device; the p99 and the maximum: the slower.
        self.assertEqual([round(float(v)) for v in out[3:]], [15, 1700, 3020, 3020])


if __name__ == "__main__":
    unittest.main()
