"""Tests of streamcost.py on hand-made raw/TAG.stream records whose answers are known
(python3 -m unittest, run by ci/unit)."""

import json
import pathlib
import tempfile
import unittest

from streamcost import (MIB, combine_streams, combine_windows, stream_cell, stream_record,
                        stream_window, window_cell, window_figures)


def job(offset, status="running"):
    """query-block-jobs' entry of the bench's stream over a 256 MiB disk."""
    return {"type": "stream", "device": "stream0", "len": 256 * MIB, "offset": offset,
            "busy": False, "paused": False, "speed": 0, "ready": False, "status": status,
            "io-status": "ok"}


def event(name, **data):
    return {"event": name, "data": data, "timestamp": {"seconds": 1, "microseconds": 0}}


def record(*lines):
    """A raw/TAG.stream: (uptime, mark or QMP message) lines, the greeting and the
    qmp_capabilities reply first."""
    head = [(99.9, {"QMP": {"version": {}, "capabilities": []}}), (100.0, {"return": {}})]
    return "".join(f"{t:.2f} {m if isinstance(m, str) else json.dumps(m)}\r\n"
                   for t, m in head + list(lines))


# The bench's sequence around a stream that outlives fio's 6 s window (fio stops at 107).
STARTED = [(100.0, "start 0"), (100.1, {"return": {}}),
           (100.1, event("JOB_STATUS_CHANGE", id="stream0", status="running"))]


class StreamRecord(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = pathlib.Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def parse(self, text, window_s=6.0):
        path = self.dir / "vmm.iothread.chain3.randread.qd1.stream-full.r1.stream"
        path.write_text(text)
        return stream_record(path, window_s)

    def test_a_stream_running_when_fio_stops(self):
        # 64 MiB walked in the 8 s from its start to query-block-jobs: 8 MiB/s, a quarter of
        # the disk; it ran through fio's window [101, 107].
        r = self.parse(record(*STARTED, (107.0, "fio-stop"), (108.0, {"return": [job(64 * MIB)]}),
                              (108.0, {"return": {}}),
                              (108.1, event("BLOCK_JOB_CANCELLED", device="stream0"))))
        self.assertEqual(r, {"speed": 0, "error": None, "running_at_end": True, "ended_s": None,
                             "coverage": 1.0, "progress": 0.25, "mib_per_s": 8.0,
                             "running_s": (None, None), "fio_stop_s": None,
                             "last_io_s": None})

    def test_a_stream_that_ends_before_fio(self):
        # Completed 4 s after its start: the window [101, 107] covered from 101 to 104, half of
        # it; the whole disk walked in 4 s. The cancel after fio's stop finds no job.
        r = self.parse(record(*STARTED, (104.0, event("BLOCK_JOB_COMPLETED", device="stream0",
                                                      len=256 * MIB, offset=256 * MIB)),
                              (107.0, "fio-stop"), (107.5, {"return": []}),
                              (107.5, {"error": {"class": "DeviceNotActive",
                                                 "desc": "Block job 'stream0' not found"}})))
        self.assertEqual(r, {"speed": 0, "error": None, "running_at_end": False,
                             "ended_s": 4.0, "coverage": 0.5, "progress": 1.0,
                             "mib_per_s": 64.0, "running_s": (None, None), "fio_stop_s": None,
                             "last_io_s": None})

    def test_a_stream_that_ends_between_fio_stop_and_the_query(self):
        # It ran through the window: still running when fio stopped.
        r = self.parse(record(*STARTED, (107.0, "fio-stop"),
                              (107.2, event("BLOCK_JOB_COMPLETED", device="stream0",
                                            len=256 * MIB, offset=256 * MIB)),
                              (107.3, {"return": []})))
        self.assertTrue(r["running_at_end"])
        self.assertIsNone(r["ended_s"])
        self.assertEqual((r["coverage"], r["progress"]), (1.0, 1.0))

    def test_a_stream_started_late_covers_part_of_the_window(self):
        # Started at 104 (3 s into fio's window [101, 107]): half of it.
        r = self.parse(record((104.0, "start 10485760"), (104.1, {"return": {}}),
                              (107.0, "fio-stop"), (108.0, {"return": [job(40 * MIB)]})))
        self.assertEqual((r["speed"], r["coverage"], r["mib_per_s"]), (10485760, 0.5, 10.0))

    def test_no_stream(self):
        # block-stream refused: the load was not there.
        r = self.parse(record((100.0, "start 0"),
                              (100.1, {"error": {"class": "GenericError",
                                                 "desc": "Device 'd0' not found"}}),
                              (107.0, "fio-stop"), (107.5, {"return": []})))
        self.assertEqual(r["error"], "Device 'd0' not found")
        # A stream whose copy failed ends with an error in its completion.
        r = self.parse(record(*STARTED, (103.0, event("BLOCK_JOB_COMPLETED", device="stream0",
                                                      len=256 * MIB, offset=MIB,
                                                      error="Input/output error")),
                              (107.0, "fio-stop"), (107.5, {"return": []})))
        self.assertEqual(r["error"], "Input/output error")
        # The VMM died before fio's end, or no record at all.
        self.assertIn("no start or no fio-stop", self.parse(record(*STARTED))["error"])
        r = self.parse(record(*STARTED, (107.0, "fio-stop")))
        self.assertEqual(r["error"], "no query-block-jobs reply after fio's stop")
        self.assertEqual(stream_record(self.dir / "missing.stream", 6.0),
                         {"error": "no missing.stream"})

    def test_the_jobs_run_on_the_hosts_wall_clock(self):
        # The clock mark puts uptime 100 at epoch 5000: block-stream's reply (the second
        # return) at 5000.1, its completion at 5004, fio's stop seen at 5007.
        r = self.parse(record((100.0, "clock 5000.0"), *STARTED,
                              (104.0, event("BLOCK_JOB_COMPLETED", device="stream0",
                                            len=256 * MIB, offset=256 * MIB)),
                              (107.0, "fio-stop"), (107.5, {"return": []})))
        self.assertEqual(r["running_s"], (5000.1, 5004.0))
        self.assertEqual(r["fio_stop_s"], 5007.0)
        self.assertIsNone(r["last_io_s"])
        # Still running at query-block-jobs' reply: it ran until then. query-blockstats before
        # it: the disk's last request completed 0.75 s before its reply at 5007.5.
        stats = {"device": "d0", "stats": {"rd_operations": 600, "idle_time_ns": 750000000}}
        r = self.parse(record((100.0, "clock 5000.0"), *STARTED, (107.0, "fio-stop"),
                              (107.5, {"return": [stats]}), (108.0, {"return": [job(64 * MIB)]})))
        self.assertEqual(r["running_s"], (5000.1, 5008.0))
        self.assertEqual(r["last_io_s"], 5006.75)
        self.assertTrue(r["running_at_end"])
        # Gone from query-block-jobs without a completion seen: its end is unknown.
        r = self.parse(record((100.0, "clock 5000.0"), *STARTED, (107.0, "fio-stop"),
                              (108.0, {"return": []})))
        self.assertEqual(r["running_s"], (5000.1, None))

    def test_the_figures_of_a_window(self):
        # fio logged a completion every 10 ms from epoch 5001 to 5006.99 (600 of them), their
        # latencies 1 to 600 µs, the slowest ones from 5004 on.
        ios = [(5001000 + 10 * i, 1000 * (i + 1)) for i in range(600)]
        whole = window_figures(ios)
        self.assertEqual((whole["ios"], whole["p50"], whole["p99"]), (600, 300.0, 594.0))
        self.assertAlmostEqual(whole["iops"], 600 / 5.99)
        # A stream from 5000.1 to 5003.0005: the completions from 5001 to 5003 (201, the
        # fastest), the window bounded by fio's first completion.
        w = window_figures(ios, 5000.1, 5003.0005)
        self.assertEqual((w["ios"], w["span_s"], w["p50"], w["p99"]), (201, 2.0, 101.0, 199.0))
        self.assertAlmostEqual(w["iops"], 100.5)
        # A stream of 0.5 s: 50 completions, too few for a p99.
        w = window_figures(ios, 5002.0, 5002.495)
        self.assertEqual(w["ios"], 50)
        self.assertNotIn("p99", w)
        self.assertIn("fewer than 100", w["error"])
        self.assertEqual(window_figures([])["error"], "no completion logged")

    def test_a_streams_window_checks_the_guests_clock(self):
        ios = [(5001000 + 10 * i, 1000 * (i + 1)) for i in range(600)]
        rec = {"error": None, "running_s": (5000.1, 5004.0), "fio_stop_s": 5007.5}
        w = stream_window(rec, ios)
        self.assertEqual((w["ios"], w["p50"], w["clock_offset_s"]), (301, 151.0, None))
        self.assertAlmostEqual(w["clock_gap_s"], 0.51)
        # The disk's last completion on the host's clock 0.1 s after fio's last on the guest's:
        # the stream's run taken from 5001 (fio's first) to 5003.9, 291 completions.
        w = stream_window(dict(rec, last_io_s=5007.09), ios)
        self.assertEqual(w["ios"], 291)
        self.assertAlmostEqual(w["clock_offset_s"], -0.1)
        # fio's stop seen before its last completion, or the disk's last completion far from
        # fio's: the clocks differ.
        for bad in ({"fio_stop_s": 5006.5}, {"last_io_s": 5007.6}, {"last_io_s": 5006.4}):
            w = stream_window(dict(rec, **bad), ios)
            self.assertIn("the guest's clock is not the host's", w["error"])
            self.assertNotIn("p50", w)
        # No clock mark (an older record), no job's end, no stream, no log.
        for running in ((None, None), (5000.1, None)):
            self.assertIn("no clock mark", stream_window(dict(rec, running_s=running), ios)["error"])
        self.assertEqual(stream_window({"error": "Device 'd0' not found"}, ios)["error"],
                         "Device 'd0' not found")
        self.assertEqual(stream_window(rec, [])["error"], "no completion logged")

    def test_windows_combined_over_rounds(self):
        rounds = [{"ios": 300, "iops": 100.0, "p50": 150.0, "p99": 300.0, "clock_gap_s": 1.0,
                   "clock_offset_s": 0.02},
                  {"ios": 320, "iops": 110.0, "p50": 140.0, "p99": 500.0, "clock_gap_s": 1.0,
                   "clock_offset_s": -0.04},
                  {"ios": 40, "span_s": 0.4,
                   "error": "40 completions in the window (fewer than 100)"}]
        both = combine_windows(rounds)
        self.assertEqual(both, {"iops": 105.0, "p50": 145.0, "p99": 400.0, "ios": [300, 320, 40],
                                "clock_offsets_s": [0.02, -0.04],
                                "errors": ["40 completions in the window (fewer than 100)"]})
        self.assertEqual(window_cell(both), "300/320/40 I/Os, clocks within 40 ms in 2/2; no "
                         "figures in 1: 40 completions in the window (fewer than 100)")
        unchecked = combine_windows([dict(rounds[0], clock_offset_s=None), rounds[1]])
        self.assertEqual(window_cell(unchecked), "300/320 I/Os, clocks within 40 ms in 1/2")
        unchecked = combine_windows([dict(w, clock_offset_s=None) for w in rounds[:2]])
        self.assertEqual(window_cell(unchecked), "300/320 I/Os, clocks unchecked")
        self.assertEqual(combine_windows(rounds[2:])["p50"], None)
        self.assertEqual(window_cell(None), "—")

    def test_rounds_combined_and_summed_up(self):
        running = {"speed": 0, "error": None, "running_at_end": True, "ended_s": None,
                   "coverage": 1.0, "progress": 0.25, "mib_per_s": 8.0}
        ended = dict(running, running_at_end=False, ended_s=4.0, coverage=0.5, progress=1.0,
                     mib_per_s=64.0)
        both = combine_streams([running, ended, dict(running, mib_per_s=10.0)])
        self.assertEqual(both, {"rounds": 3, "speed": 0, "running_at_end": 2, "ended_s": [4.0],
                                "coverage": 0.5, "progress": 0.25, "mib_per_s": 10.0,
                                "errors": []})
        self.assertEqual(stream_cell(both), "running at fio's end 2/3, 25% walked, 10 MiB/s; "
                         "ended after 4.0 s (the least of fio's window covered: 50%)")
        # Beside a completion log, which says what the stream covered, no share from the marks.
        self.assertEqual(stream_cell(both, logged=True), "running at fio's end 2/3, 25% walked, "
                         "10 MiB/s; ended after 4.0 s")
        self.assertEqual(stream_cell(combine_streams([running])),
                         "running at fio's end 1/1, 25% walked, 8 MiB/s")
        failed = combine_streams([running, {"speed": 0, "error": "Device 'd0' not found"}])
        self.assertEqual(failed["errors"], ["Device 'd0' not found"])
        self.assertEqual(stream_cell(failed), "no stream in 1/2: Device 'd0' not found")
        self.assertEqual(stream_cell(None), "—")


if __name__ == "__main__":
    unittest.main()
