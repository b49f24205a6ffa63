"""bench/report.md opens with a summary whose figures are those of its tables."""

from bench import report


def _row(case, dim, n, ms, **extra):
    return {"case": case, "dim": dim, "n": n, "median_ms": ms, "q1_ms": ms, "q3_ms": ms, **extra}


RESULT = {
    "machine": "test", "seconds": 1.0, "plots": [],
    "module": [_row("floor", 256, 512, 10.0), _row("per call", 256, 512, 10.5), _row("attached", 256, 512, 11.5)],
    "full": [_row("csrc", 64, 256, 2.0), _row("bare eigh", 64, 256, 1.0),
             _row("authors", 64, 256, 30.0, peak_mb=5.0), _row("auto (paired with authors)", 64, 256, 3.0),
             _row("csrc", 128, 256, 6.0), _row("bare eigh", 128, 256, 4.0),
             _row("authors", 128, 256, 600.0, peak_mb=50.0), _row("auto (paired with authors)", 128, 256, 6.0),
             _row("bare eigh", 128, 4096, 9.0), {"case": "authors", "dim": 128, "n": 4096, "skipped": "needs 4.0 GiB"}],
    "stages": [{"stage": st, "backend": "csrc", "dim": 128, "n": n, "median_ms": ms, "q1_ms": ms, "q3_ms": ms}
               for st, n, ms in (("statistics", 256, 1.0), ("eigh", None, 3.0), ("rebuild", None, 1.0))],
    "solvers": [{"rho": 0.3, "solver": k, "dim": 128, "n": 256, "median_ms": ms, "q1_ms": ms, "q3_ms": ms, **x}
                for k, ms, x in (("eigh", 2.0, {}), ("warm", 2.5, {"fallbacks": "40/40"}), ("bare eigh", 1.5, {}))],
}


def test_summary_states_the_tables_figures(tmp_path):
    text = "\n".join(report.summary(RESULT))
    assert "costs 1.50-2.00x a bare" in text  # 6/4 and 2/1
    assert "(d = 256, N = 512): per call 1.05x its floor, attached (two per-view calls + `optimizer.step()`) 1.15x" in text
    assert "10.0x faster at d = 64, N = 256 up to 100x at d = 128, N = 256" in text  # 30/3 and 600/6
    assert "up to 50 MiB (d = 128, N = 256) and was skipped in 1 cases" in text
    assert "eigh 3.0 ms of 5.0 ms (60 %)" in text
    assert "`warm` 2.50 ms (fell back 40/40); none is faster than eigh" in text
    report.write_markdown(RESULT, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert md.index("## Summary") < md.index("| dim |") and "10.0x faster" in md
    assert "| 256 | 512 | attached | 11.500 [11.500, 11.500] | 1.15 |" in md
