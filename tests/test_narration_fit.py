"""Localized Narratives: speech and transcript made to match at utterance boundaries, for
narrations longer than the limit, transcripts whose timing runs past their recording, and
recordings cut short."""

from __future__ import annotations

import numpy as np
import pytest

from opt.data.convert.localized_narratives import TIMING_SLACK_SECONDS, Utterance, fit_narration, parse_timed_caption
from opt.data.convert.media import Skip


def test_timed_caption_needs_finite_non_negative_times():
    timing = [{"utterance": "a", "start_time": 0, "end_time": 1}, {"utterance": "b", "start_time": 1, "end_time": 2}]
    assert parse_timed_caption(timing) == [Utterance("a", 0.0, 1.0), Utterance("b", 1.0, 2.0)]
    for bad in ([{"utterance": "a", "start_time": 0, "end_time": float("nan")}],
                [{"utterance": "a", "start_time": -1, "end_time": 1}], {"utterance": "a"}, [{"utterance": "a"}]):
        with pytest.raises(Skip) as skip:
            parse_timed_caption(bad)
        assert skip.value.reason == "row_invalid"


def test_long_narration_is_cut_at_the_last_utterance_in_time():
    wave = np.zeros(4 * 16000, dtype=np.float32)
    timing = [Utterance("a b", 0.0, 1.5), Utterance("c", 1.5, 2.5), Utterance("d", 2.5, 4.0)]
    fitted = fit_narration(wave, "a b c d", timing, 3.0)
    assert (len(fitted.wave), fitted.text, fitted.timed, fitted.changes) == \
        (40000, "a b c", timing[:2], ["narration_cut"])
    whole = fit_narration(wave, "a b c d", timing, 0)
    assert (whole.wave is wave, whole.text, whole.timed, whole.changes) == (True, "a b c d", timing, [])
    for uncuttable in ([], [Utterance("a", 0.0, 3.5)], [Utterance("a", 0.0, 0.0), Utterance("b", 0.0, 3.5)]):
        with pytest.raises(Skip, match="narration_uncuttable"):
            fit_narration(wave, "a b", uncuttable, 3.0)


def test_transcript_longer_than_its_recording_is_cut_to_the_audio_present():
    wave = np.zeros(int(1.3 * 16000), dtype=np.float32)
    timing = [Utterance("a cat", 0.0, 1.0), Utterance("sat on", 1.0, 2.0), Utterance("the mat", 2.0, 6.0)]
    for truncated in (False, True):
        fitted = fit_narration(wave, "a cat sat on the mat", timing, 10.0, truncated)
        assert (len(fitted.wave), fitted.text, fitted.timed, fitted.changes) == \
            (16000, "a cat", timing[:1], ["transcript_cut"])
    slack = [Utterance("a cat", 0.0, 1.3 + TIMING_SLACK_SECONDS / 2)]  # timing rounded a little past the end
    assert fit_narration(wave, "a cat", slack, 10.0).changes == []
    late = [Utterance("a cat", 0.5, 2.0)]
    with pytest.raises(Skip, match="narration_uncuttable"):
        fit_narration(wave, "a cat", late, 10.0)
    with pytest.raises(Skip, match="audio_truncated"):
        fit_narration(wave, "a cat", late, 10.0, truncated=True)


def test_truncated_recording_without_timing_is_skipped_and_with_timing_that_fits_is_kept():
    wave = np.zeros(16000, dtype=np.float32)
    with pytest.raises(Skip, match="audio_truncated"):
        fit_narration(wave, "a cat", [], 10.0, truncated=True)
    inside = [Utterance("a cat", 0.0, 0.8)]
    kept = fit_narration(wave, "a cat", inside, 10.0, truncated=True)
    assert (kept.wave is wave, kept.text, kept.changes) == (True, "a cat", [])
