"""Tests of report.py's figures on hand-made results whose answers are known (python3 -m unittest,
run by ci/unit; report.py needs matplotlib only to plot)."""

import json
import pathlib
import tempfile
import unittest

from report import (ab_verdicts, aio_engines, baseline_key, beyond, combine, cpu_per_io, over_host,
                    parse_run, plus, reap_figures, sort_key, stage_means, suffix_over, tag,
                    vmm_over)
from report import per_round_figures, round_ratios, stream_cost, unequal_work
from report import fio_jobs, guest_block, guest_block_table, irq_per_io, irq_table
from streamcost import MIB


def fio_json(rw, iops, n, pct_us, max_us, lat_mean_us=None, cpu=(0.0, 0.0)):
    """fio's JSON for one job: IOPS, n completions, {fio percentile key: µs}, the max."""
    side = {"iops": iops, "total_ios": n,
            "clat_ns": {"N": n, "mean": 100_000, "stddev": 1_000, "max": max_us * 1000,
                        "percentile": {k: v * 1000 for k, v in pct_us.items()}}}
    if lat_mean_us is not None:
        side["lat_ns"] = {"mean": lat_mean_us * 1000}
    return {"jobs": [{"read" if "read" in rw else "write": side,
                      "usr_cpu": cpu[0], "sys_cpu": cpu[1]}]}


PCT = {"50.000000": 100, "99.000000": 200, "99.900000": 300, "99.990000": 400}


def stages_reply(counts_totals):
    """An x-query-blockstats-stages reply line: {stage: (count, total ns)} split over two queues."""
    halves = [lambda x: x - x // 2, lambda x: x // 2]
    queues = [{"queue": q, "stages": [{"stage": st, "count": half(c), "total-ns": half(t)}
                                      for st, (c, t) in counts_totals.items()]}
              for q, half in enumerate(halves)]
    return json.dumps({"return": [{"device": "d0", "queues": queues}]})


class ReportFigures(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = pathlib.Path(self.tmp.name)

    def tearDown(self):
        self.tmp.cleanup()

    def write(self, name, text):
        (self.dir / name).write_text(text)
        return self.dir / name

    def placement_runs(self, figures, image="qcow2", rnd=""):
        """The parsed runs of {(VMM, placement field): IOPS}, randread at QD32, quiet (the host's
        native), each in raw/ as fio's JSON."""
        raw = self.dir / "raw"
        raw.mkdir(exist_ok=True)
        runs = []
        for (vmm, place), iops in figures.items():
            load = "native" if vmm == "host" else "quiet"
            path = raw / f"{vmm}.{place}.{image}.randread.qd32.{load}{rnd}.json"
            path.write_text(json.dumps(fio_json("randread", iops, 1000, PCT, 450)))
            run, why = parse_run(path)
            self.assertIsNone(why)
            runs.append((*run, ""))
        return runs

    def assert_not_run_names(self, names, image="qcow2"):
        """Each of NAMES (VMM.PLACEMENT) makes a result parse_run turns down."""
        raw = self.dir / "raw"
        raw.mkdir(exist_ok=True)
        for name in names:
            load = "native" if name.startswith("host") else "quiet"
            path = raw / f"{name}.{image}.randread.qd1.{load}.json"
            path.write_text(json.dumps(fio_json("randread", 1, 1000, PCT, 450)))
            self.assertEqual(parse_run(path)[1], f"{path.name}: not a run name")

    def test_samples_beyond_a_percentile(self):
        # 700 completions: 0.7 beyond p99.9, so the figure is the slowest one.
        self.assertEqual(beyond(700, 99.9), "[<1]")
        self.assertEqual(beyond(20_000, 99.9), "[20]")
        self.assertEqual(beyond(20_000, 99.99), "[2]")
        self.assertEqual(beyond(1_000_000, 99), "[10,000]")

    def test_host_plus_overhead(self):
        self.assertEqual(plus(150.0, 100.0), "100 + 50")
        self.assertEqual(plus(80.0, 100.0), "100 − 20")
        self.assertEqual(plus(80.0, None), "80")
        self.assertEqual(plus(None, 100.0), "—")

    def test_stage_means_are_the_growth_over_the_run(self):
        before = stages_reply({"total": (10, 10_000_000), "backend": (10, 4_000_000)})
        # 30 more requests: 60 ms more in total, 9 ms more in the backend.
        after = stages_reply({"total": (40, 70_000_000), "backend": (40, 13_000_000)})
        path = self.write("a.stages", before + "\n" + after + "\n")
        self.assertEqual(stage_means(path), {"total": 2000.0, "backend": 300.0})
        # One reply (the VMM ended between them) or a garbled one: no figures.
        self.assertEqual(stage_means(self.write("b.stages", before + "\n")), {})
        self.assertEqual(stage_means(self.write("c.stages", before + "\n{\n")), {})
        self.assertEqual(stage_means(self.dir / "missing.stages"), {})

    def test_reap_figures_are_the_growth_over_the_run(self):
        def reply(*queues):
            return json.dumps({"return": [{"device": "d0", "queues": [
                {"queue": q, "stages": [], "reaps": r, "reaped": n, "interrupts": i}
                for q, (r, n, i) in enumerate(queues)]}]})
        before = reply((10, 20, 10), (5, 5, 5))
        # 40 reaps more over the two queues, 120 requests, 30 interrupts.
        after = reply((30, 100, 30), (25, 45, 15))
        path = self.write("r.stages", before + "\n" + after + "\n")
        self.assertEqual(reap_figures(path), {"per_reap": 3.0, "irq_per_reap": 0.75})
        # No reap between the replies, counters missing (an older vmm), one reply: nothing.
        self.assertEqual(reap_figures(self.write("s.stages", before + "\n" + before)), {})
        old = stages_reply({"total": (1, 1)})
        self.assertEqual(reap_figures(self.write("t.stages", old + "\n" + old)), {})
        self.assertEqual(reap_figures(self.write("u.stages", before + "\n")), {})

    def test_cpu_per_io_from_the_thread_profile(self):
        # 2 s of wall time, 500 + 300 ms on vCPUs and 200 ms elsewhere, at 1000 IOPS:
        # 1000 ms of CPU over 2000 I/Os = 500 µs per I/O, 400 of them on the vCPUs; the
        # non-vCPU threads waited 40 + 60 ms for a CPU: 50 µs per I/O.
        path = self.write("a.sched", "vcpu0 500 10\nCPU_1/KVM 300 7\nd0-io0 200 40\n"
                          "vmm 0 60\nwall_ms 2000 0\n")
        self.assertEqual(cpu_per_io(path, 1000), {"total": 500.0, "vcpu": 400.0, "waited": 50.0})
        self.assertEqual(cpu_per_io(path, 0), {})
        self.assertEqual(cpu_per_io(self.dir / "missing.sched", 1000), {})

    def test_guest_interrupts_per_io_by_kind(self):
        # 6 s of fio (ramp included) at 500 IOPS: 3000 I/Os.
        path = self.write("a.irq", "ttyS0 868\nvirtio0-config 0\nvirtio0-req.0 450\n"
                          "virtio0-req.1 450\nLOC 2400\nRES 100\nCAL 200\n")
        self.assertEqual(irq_per_io(path, 3000), {"virtio": 0.3, "timer": 0.8, "ipi": 0.1})
        # virtio-mmio's one line, and a configuration vector that fired, not counted.
        path = self.write("b.irq", "virtio0 300\nvirtio1-config 5\n")
        self.assertEqual(irq_per_io(path, 3000), {"virtio": 0.1, "timer": 0.0, "ipi": 0.0})
        self.assertEqual(irq_per_io(path, 0), {})
        self.assertEqual(irq_per_io(self.dir / "missing.irq", 3000), {})
        raw = self.dir / "raw"
        raw.mkdir()
        doc = fio_json("randread", 500, 2500, PCT, 450)
        doc["jobs"][0]["elapsed"] = 6
        (raw / "vmm.iothread+pci.qcow2.randread.qd32.quiet.json").write_text(json.dumps(doc))
        (raw / "vmm.iothread+pci.qcow2.randread.qd32.quiet.irq").write_text(
            (self.dir / "a.irq").read_text())
        run, why = parse_run(raw / "vmm.iothread+pci.qcow2.randread.qd32.quiet.json")
        self.assertIsNone(why)
        runs = combine([(*run, "")])
        self.assertEqual(runs[0][0]["irq_per_io"], {"virtio": 0.3, "timer": 0.8, "ipi": 0.1})
        self.assertIn("| vmm | iothread+pci | qcow2 | randread | 32 | quiet | 0.30 | 0.80 | 0.10 |",
                      irq_table(runs))

    def test_where_fios_latency_went_in_the_guest(self):
        self.assertEqual(guest_block(self.write("a.gt", "2000 300.5 4000 9000 12000\n")),
                         {"ios": 2000, "before": 300.5, "device": 4000, "p99": 9000,
                          "max": 12000})
        # No trace, a trace that saw nothing, a torn line: no figures.
        self.assertEqual(guest_block(self.dir / "missing.gt"), {})
        self.assertEqual(guest_block(self.write("b.gt", "0 0 0 0 0\n")), {})
        self.assertEqual(guest_block(self.write("c.gt", "2000 300 4000\n")), {})
        raw = self.dir / "raw"
        raw.mkdir()
        rounds = []
        # Two rounds: fio's mean latency 5,000 and 7,000 µs, its p99 200 (PCT) both times; the
        # block layer's p99 9,000 and 11,000, so the median row reads 10,000.
        for rnd, (fio_mean, p99) in enumerate(((5000, 9000), (7000, 11000)), 1):
            name = f"vmm.iothread.qcow2.randread.qd32.quiet.r{rnd}"
            doc = fio_json("randread", 500, 2500, PCT, 450, lat_mean_us=fio_mean)
            (raw / f"{name}.json").write_text(json.dumps(doc))
            (raw / f"{name}.gt").write_text(f"2000 300 4000 {p99} 12000\n")
            run, why = parse_run(raw / f"{name}.json")
            self.assertIsNone(why)
            rounds.append((*run, ""))
        # QEMU's run was not traced: no row of its own, nothing borrowed from vmm's.
        doc = fio_json("randread", 400, 2000, PCT, 450, lat_mean_us=8000)
        (raw / "qemu.iothread.qcow2.randread.qd32.quiet.r1.json").write_text(json.dumps(doc))
        run, why = parse_run(raw / "qemu.iothread.qcow2.randread.qd32.quiet.r1.json")
        self.assertIsNone(why)
        runs = combine(rounds + [(*run, "")])
        self.assertEqual(runs[0][0]["guest_block_us"]["p99"], 10000)
        table = guest_block_table(runs)
        # fio 6,000 = 300 before the driver + 4,000 at the device + 1,700 after.
        self.assertIn("| vmm | iothread | qcow2 | randread | 32 | quiet | 6,000 | 300 | 4,000 | "
                      "1,700 | 10,000 | 12,000 | 200 | 2,000 |", table)
        self.assertFalse([row for row in table if row.startswith("| qemu")])
        self.assertEqual(guest_block_table(combine([(*run, "")])), [])

    def test_fio_jobs_from_the_machine_file(self):
        self.assertEqual(fio_jobs({}), "one job pinned to vCPU 0")
        self.assertEqual(fio_jobs({"numjobs": "1"}), "one job pinned to vCPU 0")
        self.assertTrue(fio_jobs({"numjobs": "2"}).startswith(
            "2 jobs (`--numjobs=2 --cpus_allowed_policy=split`, one per vCPU;"))

    def test_host_baseline_and_vmm_rows(self):
        raw = self.dir / "raw"
        raw.mkdir()
        (raw / "host.main-loop.raw.randwrite.qd1.native.json").write_text(json.dumps(
            fio_json("randwrite", 500, 2500, PCT, 450, cpu=(5.0, 20.0))))
        vmm_pct = {k: v * 3 for k, v in PCT.items()}
        (raw / "vmm.main-loop.raw.randwrite.qd1.quiet.json").write_text(json.dumps(
            fio_json("randwrite", 100, 700, vmm_pct, 1500, lat_mean_us=2500)))
        (raw / "vmm.main-loop.raw.randwrite.qd1.quiet.sched").write_text(
            "vcpu0 100 0\nvmm 100 0\nwall_ms 1000 0\n")
        # A host run needs the "native" load, a VMM's one of the others.
        (raw / "host.main-loop.raw.randwrite.qd1.quiet.json").write_text("{}")
        host, why = parse_run(raw / "host.main-loop.raw.randwrite.qd1.native.json")
        self.assertIsNone(why)
        # fio's 25 % of a CPU at 500 IOPS: 500 µs per I/O.
        self.assertEqual(host[0]["cpu_us_per_io"], {"total": 500.0})
        self.assertEqual(host[0]["completions"], 2500)
        vmm, _ = parse_run(raw / "vmm.main-loop.raw.randwrite.qd1.quiet.json")
        self.assertEqual(vmm[0]["lat_us"]["max"], 1500)
        self.assertEqual(vmm[0]["lat_us"]["lat_mean"], 2500)
        self.assertEqual(vmm[0]["cpu_us_per_io"], {"total": 2000.0, "vcpu": 1000.0,
                                                   "waited": 0.0})
        self.assertIsNone(parse_run(raw / "host.main-loop.raw.randwrite.qd1.quiet.json")[0])
        runs = combine([(*host, ""), (*vmm, "")])
        base = next(r[0] for r in runs if r[0]["vmm"] == "host")
        obj = next(r[0] for r in runs if r[0]["vmm"] == "vmm")
        lines = over_host([(obj,)], {("main-loop", "raw", "randwrite", 1): base})
        vmm_line = next(ln for ln in lines if ln.startswith("| vmm "))
        # p50 100 + 200, p99 200 + 400 (7 beyond of 700 completions), p99.9 300 + 600 (under
        # one beyond).
        self.assertIn("| 700 | 100 + 200 | 200 + 400 [7] | 300 + 600 [<1] | 400 + 800 [<1] | "
                      "450 + 1,050 | 2,000.0 (vCPUs 1,000.0) | 0.0 |", vmm_line)
        host_line = next(ln for ln in lines if ln.startswith("| host fio "))
        self.assertIn("| 2,500 | 100 | 200 [25] | 300 [2] | 400 [<1] | 450 | 500.0 | — |", host_line)

    def test_a_variant_is_a_column_compared_with_vmm(self):
        raw = self.dir / "raw"
        raw.mkdir()
        # Five rounds each: vmm at 100 IOPS (p99 200 µs), the variant at 120 (p99 the same);
        # qemu at 100, as vmm.
        figures = {"vmm": [100, 101, 99, 100, 100], "vmm-nosandbox": [120, 121, 119, 120, 120],
                   "qemu": [100, 99, 101, 100, 100]}
        runs = []
        for vmm, iops in figures.items():
            for r, x in enumerate(iops, 1):
                path = raw / f"{vmm}.iothread.qcow2.randread.qd1.quiet.r{r}.json"
                path.write_text(json.dumps(fio_json("randread", x, 1000, PCT, 450)))
                run, why = parse_run(path)
                self.assertIsNone(why)
                runs.append((*run, ""))
        per_round = per_round_figures(runs)
        runs = combine(runs)
        runs.sort(key=lambda r: sort_key(r[0]))
        self.assertEqual([r[0]["vmm"] for r in runs], ["vmm", "vmm-nosandbox", "qemu"])
        vs_variant = ab_verdicts(runs, per_round, "vmm-nosandbox")
        vs_qemu = ab_verdicts(runs, per_round)
        key = ("vmm", "iothread", "qcow2", "randread", 1, "quiet")
        # 100 over 120: -17 %, the rounds fully apart: the smallest p of 5 + 5 rounds, 2 / 252.
        self.assertEqual(vs_variant[key]["iops"]["verdict"], "slower")
        self.assertAlmostEqual(vs_variant[key]["iops"]["change"], -1 / 6)
        self.assertAlmostEqual(vs_variant[key]["iops"]["p"], 2 / 252)
        self.assertEqual(vs_variant[key]["p99"]["verdict"], "no difference at this noise")
        self.assertEqual(vs_qemu[key]["iops"]["verdict"], "no difference at this noise")
        self.assertEqual(runs[0][0]["vs_vmm-nosandbox"], vs_variant[key])
        self.assertEqual(runs[0][0]["vs_qemu"], vs_qemu[key])
        md = vmm_over(runs, "vmm-nosandbox", "vmm-nosandbox (`-sandbox off`)", vs_variant, 5)
        self.assertIn("## vmm over vmm-nosandbox (`-sandbox off`)", md[1])
        self.assertIn("| iothread | qcow2 | randread | 1 | quiet | 0.83 | 1.00 | 1.00 | 1.00 | "
                      "slower (-17%, p=0.00794) | no difference at this noise (+0%, p=1) |", md)

    def test_transport_and_polling_in_the_placement_field(self):
        # IOPS per run: on PCI vmm 200 and QEMU 160, on MMIO both 100; polling off on PCI: 150.
        figures = {("vmm", "iothread"): 100, ("qemu", "iothread"): 100,
                   ("vmm", "iothread+pci"): 200, ("qemu", "iothread+pci"): 160,
                   ("vmm", "iothread+pci+nopoll"): 150, ("host", "iothread"): 400}
        runs = self.placement_runs(figures, rnd=".r2")
        objs = {(r[0]["vmm"], r[0]["placement"]): r[0] for r in runs}
        pci_off = objs[("vmm", "iothread+pci+nopoll")]
        self.assertEqual((pci_off["placement"], pci_off["transport"], pci_off["poll"]),
                         ("iothread+pci+nopoll", "pci", "off"))
        self.assertEqual((objs[("qemu", "iothread")]["transport"],
                          objs[("qemu", "iothread")]["poll"]), ("mmio", "default"))
        # Every VMM run's host-native baseline is the plain placement's.
        self.assertEqual(baseline_key(pci_off), baseline_key(objs[("host", "iothread")]))
        self.assertEqual(baseline_key(pci_off), ("iothread", "qcow2", "randread", 32))
        # Not run names: suffixes out of order, unknown or repeated, polling off on the main
        # loop, a host baseline with a transport.
        self.assert_not_run_names(["vmm.iothread+nopoll+pci", "vmm.iothread+virtio",
                                   "vmm.iothread+pci+pci", "vmm.main-loop+nopoll",
                                   "host.iothread+pci"])
        runs = [r for r in combine(runs) if r[0]["vmm"] != "host"]
        runs.sort(key=lambda r: sort_key(r[0]))
        self.assertEqual([(r[0]["vmm"], r[0]["placement"]) for r in runs],
                         [("vmm", "iothread"), ("qemu", "iothread"), ("vmm", "iothread+pci"),
                          ("qemu", "iothread+pci"), ("vmm", "iothread+pci+nopoll")])
        # vmm over QEMU pairs the rows of the same transport: 200 over 160 on PCI.
        md = vmm_over(runs, "qemu", "QEMU", {}, 1)
        self.assertIn("| iothread | qcow2 | randread | 32 | quiet | 1.00 | 1.00 | 1.00 | 1.00 | "
                      "— | — |", md)
        self.assertIn("| iothread+pci | qcow2 | randread | 32 | quiet | 1.25 | 1.00 | 1.00 | "
                      "1.00 | — | — |", md)
        # PCI over MMIO per VMM: vmm 2.00, QEMU 1.60; the PCI run without polling has no MMIO
        # one to compare with. Polling off over on: 150 over 200.
        md = suffix_over(runs, "pci", "PCI over MMIO")
        self.assertEqual(md[5:], [
            "| vmm | iothread+pci | qcow2 | randread | 32 | quiet | 2.00 | 1.00 | 1.00 | 1.00 |",
            "| qemu | iothread+pci | qcow2 | randread | 32 | quiet | 1.60 | 1.00 | 1.00 | 1.00 |"])
        md = suffix_over(runs, "nopoll", "Polling off over polling on")
        self.assertEqual(md[5:], [
            "| vmm | iothread+pci+nopoll | qcow2 | randread | 32 | quiet | 0.75 | 1.00 | 1.00 | "
            "1.00 |"])
        self.assertEqual(suffix_over(runs[:2], "pci", "PCI over MMIO"), [])

    def test_one_iothread_per_queue_in_the_placement_field(self):
        # IOPS per run on PCI: one iothread 100 for both, one per queue vmm 170 and QEMU 150,
        # one per queue with polling off vmm 160.
        figures = {("vmm", "iothread+pci"): 100, ("qemu", "iothread+pci"): 100,
                   ("vmm", "iothread+pci+per-queue"): 170,
                   ("qemu", "iothread+pci+per-queue"): 150,
                   ("vmm", "iothread+pci+per-queue+nopoll"): 160}
        runs = self.placement_runs(figures)
        objs = {(r[0]["vmm"], r[0]["placement"]): r[0] for r in runs}
        mapped = objs[("vmm", "iothread+pci+per-queue+nopoll")]
        self.assertEqual((mapped["transport"], mapped["mapping"], mapped["poll"]),
                         ("pci", "per-queue", "off"))
        self.assertEqual(objs[("qemu", "iothread+pci")]["mapping"], "one")
        self.assertEqual(baseline_key(mapped), ("iothread", "qcow2", "randread", 32))
        # Not run names: per-queue without PCI or on the main loop, out of order, on the host.
        self.assert_not_run_names(["vmm.iothread+per-queue", "vmm.main-loop+pci+per-queue",
                                   "vmm.iothread+pci+nopoll+per-queue",
                                   "host.iothread+pci+per-queue"])
        runs = combine(runs)
        runs.sort(key=lambda r: sort_key(r[0]))
        self.assertEqual([(r[0]["vmm"], r[0]["placement"]) for r in runs],
                         [("vmm", "iothread+pci"), ("qemu", "iothread+pci"),
                          ("vmm", "iothread+pci+per-queue"), ("qemu", "iothread+pci+per-queue"),
                          ("vmm", "iothread+pci+per-queue+nopoll")])
        # One per queue over one per VMM: vmm 1.70, QEMU 1.50 (the run without polling has no
        # one-iothread run to compare with); polling off over on: 160 over 170.
        md = suffix_over(runs, "per-queue", "One iothread per queue over one iothread")
        self.assertEqual(md[5:], [
            "| vmm | iothread+pci+per-queue | qcow2 | randread | 32 | quiet | 1.70 | 1.00 | "
            "1.00 | 1.00 |",
            "| qemu | iothread+pci+per-queue | qcow2 | randread | 32 | quiet | 1.50 | 1.00 | "
            "1.00 | 1.00 |"])
        md = suffix_over(runs, "nopoll", "Polling off over polling on")
        self.assertEqual(md[5:], [
            "| vmm | iothread+pci+per-queue+nopoll | qcow2 | randread | 32 | quiet | 0.94 | "
            "1.00 | 1.00 | 1.00 |"])
        # vmm over QEMU pairs the rows of the same mapping: 170 over 150.
        md = vmm_over(runs, "qemu", "QEMU", {}, 1)
        self.assertIn("| iothread+pci+per-queue | qcow2 | randread | 32 | quiet | 1.13 | 1.00 | "
                      "1.00 | 1.00 | — | — |", md)

    def test_the_aio_engine_in_the_placement_field(self):
        # IOPS per run: vmm 80 on threads, 100 on io_uring; QEMU 60 on threads, 72 on io_uring,
        # 120 on native and with its best engine (unsuffixed).
        figures = {("vmm", "iothread+aio-threads"): 80, ("vmm", "iothread+aio-io_uring"): 100,
                   ("qemu", "iothread+aio-native"): 120, ("qemu", "iothread+aio-io_uring"): 72,
                   ("qemu", "iothread+aio-threads"): 60, ("qemu", "iothread"): 120}
        runs = self.placement_runs(figures, image="raw")
        objs = {(r[0]["vmm"], r[0]["placement"]): r[0] for r in runs}
        self.assertEqual(objs[("qemu", "iothread+aio-native")]["aio"], "native")
        self.assertEqual(objs[("qemu", "iothread")]["aio"], "best")
        self.assertEqual(baseline_key(objs[("vmm", "iothread+aio-io_uring")]),
                         ("iothread", "raw", "randread", 32))
        # Not run names: two engines, out of order, an unknown one, native for vmm or a
        # variant (vmm has no linux-aio), an engine on the host.
        self.assert_not_run_names(["qemu.iothread+aio-threads+aio-native",
                                   "qemu.iothread+aio-native+nopoll", "qemu.iothread+aio-posix",
                                   "vmm.iothread+aio-native", "vmm-main.iothread+aio-native",
                                   "host.iothread+aio-threads"], image="raw")
        runs = combine(runs)
        runs.sort(key=lambda r: sort_key(r[0]))
        self.assertEqual([(r[0]["vmm"], r[0]["placement"]) for r in runs],
                         [("qemu", "iothread"), ("vmm", "iothread+aio-threads"),
                          ("qemu", "iothread+aio-threads"), ("vmm", "iothread+aio-io_uring"),
                          ("qemu", "iothread+aio-io_uring"), ("qemu", "iothread+aio-native")])
        # Each VMM's engines over its fastest: vmm first, then QEMU, its best engine first.
        md = aio_engines(runs, {"vmm": "io_uring", "qemu": "native"})
        self.assertEqual(md[7:], [
            "| vmm | iothread | raw | randread | 32 | quiet | threads | 80 | 100 | 200 | 0.80 | "
            "1.00 |",
            "| vmm | iothread | raw | randread | 32 | quiet | io_uring | 100 | 100 | 200 | 1.00 | "
            "1.00 |",
            "| qemu | iothread | raw | randread | 32 | quiet | best (native) | 120 | 100 | 200 | "
            "1.00 | 1.00 |",
            "| qemu | iothread | raw | randread | 32 | quiet | threads | 60 | 100 | 200 | 0.50 | "
            "1.00 |",
            "| qemu | iothread | raw | randread | 32 | quiet | io_uring | 72 | 100 | 200 | 0.60 | "
            "1.00 |",
            "| qemu | iothread | raw | randread | 32 | quiet | native | 120 | 100 | 200 | 1.00 | "
            "1.00 |"])
        # One engine per VMM and row: no table.
        self.assertEqual(aio_engines(runs[:2], {}), [])
        # vmm over QEMU pairs the rows of the same engine: 80 over 60 on threads.
        md = vmm_over(runs, "qemu", "QEMU", {}, 1)
        self.assertIn("| iothread+aio-threads | raw | randread | 32 | quiet | 1.33 | 1.00 | "
                      "1.00 | 1.00 | — | — |", md)

    def test_a_streams_cost_beside_qemus(self):
        raw = self.dir / "raw"
        raw.mkdir()
        # Five rounds of 6 s. Quiet: 1000 IOPS, p50 100 µs, p99 200 µs for both. Under the
        # stream both lose a fifth of their IOPS and p50 grows by 1.2; p99 grows by 1.5 under
        # vmm (1.49 to 1.51 by round) and by 2 under QEMU. Each stream still runs at fio's end
        # (fio stops at 107): vmm's has walked 64 MiB of 256 in 8 s, QEMU's 128.
        p99 = {("vmm", "quiet"): [200] * 5, ("vmm", "stream-full"): [300, 302, 298, 300, 300],
               ("qemu", "quiet"): [200] * 5, ("qemu", "stream-full"): [400] * 5}
        walked = {"vmm": 64, "qemu": 128}
        runs = []
        for (vmm, load), tails in p99.items():
            for r, tail in enumerate(tails, 1):
                name = f"{vmm}.iothread.chain3.randread.qd1.{load}.r{r}"
                scale = 1.2 if load != "quiet" else 1
                doc = fio_json("randread", 1000 / scale ** 1.25 if load != "quiet" else 1000,
                               6000, {"50.000000": 100 * scale, "99.000000": tail}, 900)
                doc["jobs"][0]["read"]["runtime"] = 6000
                (raw / f"{name}.json").write_text(json.dumps(doc))
                if load != "quiet":
                    jobs = [{"device": "stream0", "status": "running",
                             "offset": walked[vmm] * MIB, "len": 256 * MIB}]
                    (raw / f"{name}.stream").write_text(
                        f"100.0 start 0\n100.1 {{\"return\": {{}}}}\n107.0 fio-stop\n"
                        f"108.0 {json.dumps({'return': jobs})}\n")
                run, why = parse_run(raw / f"{name}.json")
                self.assertIsNone(why)
                self.assertEqual(run[0]["round"], r)
                runs.append((*run, ""))
        per_round = per_round_figures(runs)
        key = ("iothread", "chain3", "randread", 1, "stream-full")
        self.assertEqual(round_ratios(per_round, ("vmm",) + key, "p99"),
                         [1.5, 1.51, 1.49, 1.5, 1.5])
        # A round whose quiet run is missing has no ratio.
        del per_round[("qemu",) + key[:4] + ("quiet",)]["round"][2]
        self.assertEqual(round_ratios(per_round, ("qemu",) + key, "p99"), [2.0] * 4)
        per_round = per_round_figures(runs)
        runs = combine(runs)
        runs.sort(key=lambda r: sort_key(r[0]))
        md = stream_cost(runs, per_round, 5)
        self.assertEqual(md[1], "## What a block-stream costs the guest "
                         "(under the stream over quiet)")
        self.assertIn("| iothread | chain3 | randread | 1 | stream-full | 0.80 | 0.80 | 1.20 | "
                      "1.20 | 1.50 | 2.00 | running at fio's end 5/5, 25% walked, 8 MiB/s | "
                      "running at fio's end 5/5, 50% walked, 16 MiB/s | — | — |", md)
        # vmm's p99 ratios all below QEMU's: the smallest p of 5 + 5 rounds, 2 / 252.
        self.assertEqual(md[-1], "- iothread chain3 randread QD1 stream-full: IOPS ×0.80 under "
                         "vmm, ×0.80 under QEMU: no difference at this noise (+0%, p=1); p50 "
                         "×1.20 under vmm, ×1.20 under QEMU: no difference at this noise (+0%, "
                         "p=1); p99 ×1.50 under vmm, ×2.00 under QEMU: vmm's guest pays less "
                         "(-25%, p=0.00794). The streams differed: vmm's walked 8 MiB/s, "
                         "QEMU's 16 MiB/s, so the guests did not bear the same load.")
        # QEMU's stream walked twice as fast: the verdict line says the loads differed.
        self.assertEqual(unequal_work({"mib_per_s": 8.0}, {"mib_per_s": 16.0}),
                         " The streams differed: vmm's walked 8 MiB/s, QEMU's 16 MiB/s, so the "
                         "guests did not bear the same load.")
        self.assertEqual(unequal_work({"mib_per_s": 10.0}, {"mib_per_s": 12.0}), "")
        self.assertEqual(unequal_work({"mib_per_s": 10.0}, {}), "")
        objs = {tag(r[0]): r[0] for r in runs}
        vmm = objs[("vmm",) + key]
        self.assertAlmostEqual(vmm["vs_quiet"]["p99"], 1.5)
        self.assertEqual(vmm["stream_cost_vs_qemu"]["p99"]["verdict"], "faster")
        self.assertEqual(objs[("qemu",) + key]["stream"]["running_at_end"], 5)
        self.assertNotIn("round", vmm)
        # Without stream loads, no section; without QEMU's quiet runs, no verdict.
        self.assertEqual(stream_cost([r for r in runs if "stream" not in r[0]], per_round, 5), [])
        per_round = {t: v for t, v in per_round.items() if t[::5] != ("qemu", "quiet")}
        md = stream_cost([r for r in runs if tag(r[0])[::5] != ("qemu", "quiet")], per_round, 3)
        self.assertIn("| iothread | chain3 | randread | 1 | stream-full | 0.80 | — | 1.20 | — | "
                      "1.50 | — | running at fio's end 5/5, 25% walked, 8 MiB/s | "
                      "running at fio's end 5/5, 50% walked, 16 MiB/s | — | — |", md)
        self.assertIn("with 3 round(s) none can be called", md[3])
        self.assertEqual(md[-1], "- No verdict: a VMM has no quiet run to compare with.")

    def test_a_streams_cost_from_the_completions_while_it_ran(self):
        raw = self.dir / "raw"
        raw.mkdir()
        # fio logs a completion every 10 ms from epoch 5001 to 5006.99 in every run, 100 µs
        # each, but 300 µs while vmm's stream ran (block-stream's reply at 5000.1 to its
        # completion at 5003: 201 completions, the last one after it). QEMU's stream ended at
        # 5001.5: 51 completions, too few. fio's JSON (its whole window) says 100 µs for all.
        ends = {"vmm": 103.0, "qemu": 101.5}
        runs = []
        for vmm in ("vmm", "qemu"):
            for load in ("quiet", "stream-full"):
                name = f"{vmm}.iothread.chain3.randread.qd1.{load}"
                doc = fio_json("randread", 100, 600, {"50.000000": 100, "99.000000": 100}, 300)
                doc["jobs"][0]["read"]["runtime"] = 6000
                (raw / f"{name}.json").write_text(json.dumps(doc))
                slow = load != "quiet" and vmm == "vmm"
                (raw / f"{name}.lat").write_text("".join(
                    f"{5001000 + 10 * i} {300000 if slow and i < 200 else 100000}\n"
                    for i in range(600)))
                if load != "quiet":
                    done = {"event": "BLOCK_JOB_COMPLETED",
                            "data": {"device": "stream0", "len": 256 * MIB, "offset": 256 * MIB}}
                    (raw / f"{name}.stream").write_text(
                        "100.0 clock 5000.0\n100.0 {\"return\": {}}\n100.0 start 0\n"
                        f"100.1 {{\"return\": {{}}}}\n{ends[vmm]} {json.dumps(done)}\n"
                        "107.5 fio-stop\n107.6 {\"return\": []}\n")
                run, why = parse_run(raw / f"{name}.json")
                self.assertIsNone(why)
                runs.append((*run, ""))
        window = {tag(r[0]): r[0]["window"] for r in runs}
        self.assertEqual(window[("vmm",) + ("iothread", "chain3", "randread", 1, "stream-full")]
                         ["ios"], 201)
        per_round = per_round_figures(runs)
        runs = combine(runs)
        runs.sort(key=lambda r: sort_key(r[0]))
        md = stream_cost(runs, per_round, 1)
        # vmm: IOPS 100.5 over quiet's 600 / 5.99 s, p50 and p99 300 over 100.
        self.assertIn("| iothread | chain3 | randread | 1 | stream-full | 1.00 | — | 3.00 | — | "
                      "3.00 | — | running at fio's end 0/1, 100% walked, 85 MiB/s; ended after "
                      "3.0 s | running at fio's end 0/1, 100% walked, 171 MiB/s; ended after "
                      "1.5 s | 201 I/Os, clocks unchecked | 51 I/Os, clocks "
                      "unchecked; no figures in 1: 51 completions in the window (fewer than "
                      "100) |", md)
        self.assertEqual(md[-1], "- iothread chain3 randread QD1 stream-full: no verdict: "
                         "qemu's stream has no figures in a round (51 completions in the window "
                         "(fewer than 100)).")
        self.assertEqual(round_ratios(per_round, ("vmm", "iothread", "chain3", "randread", 1,
                                                  "stream-full"), "p99"), [3.0])


if __name__ == "__main__":
    unittest.main()
