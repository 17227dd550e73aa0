"""Tests of inner.sh's guest script on the kernel's command line (python3 -m unittest, run by
ci/unit): the script runs as its inner half does, in sh, on the plans ci/bench-latency makes."""

import base64
import os
import subprocess
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


if __name__ == "__main__":
    unittest.main()
