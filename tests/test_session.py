"""session.py's speed comparison: median, spread, and when it refuses to conclude."""

from bigload.cli.session import DEMO_MAX_SPREAD, SpeedComparison


def test_close_runs_give_a_conclusive_median_ratio():
    speeds = SpeedComparison(offloaded=(90.0, 100.0, 95.0), in_memory=(100.0, 100.0, 100.0))
    assert speeds.ratio == 0.95
    assert abs(speeds.spread - 0.10 / 0.95) < 1e-12
    assert speeds.conclusive
    assert "0.95x" in speeds.render() and "warning" not in speeds.render()


def test_scattered_runs_print_a_plain_warning():
    speeds = SpeedComparison(offloaded=(73.0, 23.0, 59.0), in_memory=(100.0, 100.0, 100.0))
    assert speeds.spread > DEMO_MAX_SPREAD and not speeds.conclusive
    rendered = speeds.render()
    assert "warning: the runs differ by" in rendered and "too much to conclude" in rendered
    assert "0.23x to 0.73x" in rendered
