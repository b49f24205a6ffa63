"""The figure CLI writes its PNGs (one cheap figure; the full set takes about a minute)."""

import pytest

pytest.importorskip("matplotlib")

from fastpred.theory import figures  # noqa: E402


def test_cli_writes_png(tmp_path):
    paths = figures.main(["--out", str(tmp_path / "figs"), "--only", "fig4"])
    assert [p.name for p in paths] == ["fig4_fixed_points.png"]
    data = paths[0].read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_cli_rejects_unknown_figure(tmp_path):
    with pytest.raises(SystemExit):
        figures.main(["--out", str(tmp_path), "--only", "fig6"])
