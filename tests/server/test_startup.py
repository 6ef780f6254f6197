"""What `streamdiff serve` prints at start-up (issue 16, items 2 and 4): the measured step time
and the fps one stream can expect, the preset's service level, and a viewer URL that carries
the token when one is set."""

from __future__ import annotations

from streamdiff.config import load_config
from streamdiff.server.app import ServerSettings, startup_lines


def test_startup_lines_show_the_measured_step_the_expectation_and_a_working_viewer_url():
    cfg = load_config("tiny")
    lines = startup_lines(cfg, ServerSettings(token="s3cret"), "127.0.0.1", 8011, (412.0, 9.7, 1650.0))
    text = "\n".join(lines)
    assert "measured step 412 ms" in text and "about 9.7 fps" in text and "1650 ms latency" in text
    assert "service level 2 fps, 8000 ms" in text  # the preset's own, no flags given
    assert "viewer http://127.0.0.1:8011/viewer.html?key=<key>&token=s3cret" in text
    assert "http://127.0.0.1:8011/?token=s3cret" in text
    plain = "\n".join(startup_lines(cfg, ServerSettings(target_fps=5.0), "127.0.0.1", 8000, (100.0, 30.0, 300.0)))
    assert "token" not in plain and "service level 5 fps" in plain
